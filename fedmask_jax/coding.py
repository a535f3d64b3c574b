"""Real bitstreams for binary masks: range coding with ``constriction``.

Two codes for one mask, both lossless:

* *global* -- every entry is Bernoulli(f) with f the mask's own fraction of ones, sent
  first as a 32-bit count; the cost the reference's ideal H_b(f) + log2(n)/n stands for;
* *prior* -- entry i is Bernoulli(theta_i) with theta the probabilities both ends already
  hold (the server's broadcast theta_g), free side information that is worth most when the
  clients' masks agree with the global model.

Coding runs on the host, outside the jitted round. Sizes are whole 32-bit words, the unit
``constriction``'s range coder emits.
"""

from __future__ import annotations

import numpy as np

COUNT_BITS = 32  # the global code's header: the number of ones
# Keep-probabilities are clipped to [P_MIN, 1 - P_MIN] so that an entry the model is sure
# about stays codable; the ideal code lengths computed on the device use the same clip.
P_MIN = 1e-7


def _bernoulli(p: float | None = None):
    import constriction

    if p is None:  # per-symbol probabilities, given with the symbols
        return constriction.stream.model.Bernoulli(perfect=False)
    return constriction.stream.model.Bernoulli(float(np.clip(p, P_MIN, 1 - P_MIN)), perfect=False)


def _probs(p: np.ndarray, n: int) -> np.ndarray:
    p = np.broadcast_to(np.asarray(p, np.float64), (n,))
    # constriction needs p in [0, 1]; clip so that an entry it is sure about stays codable.
    return np.clip(p, P_MIN, 1 - P_MIN)


def encode(mask: np.ndarray, probs) -> np.ndarray:
    """Range-codes a flat 0/1 mask with per-entry (or one scalar) keep-probabilities.

    A scalar probability uses one fixed model (the same stream as a constant array, without
    allocating one)."""
    import constriction

    symbols = np.ascontiguousarray(mask, np.int32).ravel()
    enc = constriction.stream.queue.RangeEncoder()
    if np.ndim(probs) == 0:
        enc.encode(symbols, _bernoulli(probs))
    else:
        enc.encode(symbols, _bernoulli(), _probs(probs, symbols.size))
    return enc.get_compressed()


def decode(words: np.ndarray, probs, n: int) -> np.ndarray:
    """Inverse of ``encode``: n 0/1 entries (uint8)."""
    import constriction

    dec = constriction.stream.queue.RangeDecoder(np.asarray(words, np.uint32))
    if np.ndim(probs) == 0:
        return dec.decode(_bernoulli(probs), n).astype(np.uint8)
    return dec.decode(_bernoulli(), _probs(probs, n)).astype(np.uint8)


def global_probability(num_ones: int, n: int) -> float:
    return num_ones / n


def encode_global(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """The global code: (number of ones, words)."""
    mask = np.asarray(mask).ravel()
    ones = int(mask.sum())
    return ones, encode(mask, global_probability(ones, mask.size))


def decode_global(ones: int, words: np.ndarray, n: int) -> np.ndarray:
    return decode(words, global_probability(ones, n), n)


def global_bits(words: np.ndarray) -> int:
    return 32 * len(words) + COUNT_BITS


def prior_bits(words: np.ndarray) -> int:
    return 32 * len(words)


# What a real stream may cost above its ideal length (``max_bits``):
# * RELATIVE_SLACK of it, for the coder's 24-bit quantization of each probability;
# * FLUSH_BITS, the two 32-bit words that flush the coder's state;
# * PER_SYMBOL_BITS for every entry. The range coder rounds its range down to a multiple of
#   2^24 at each symbol, a loss that does not shrink with the symbol's information, so a mask
#   the model is sure about (an ideal length far below n bits) pays mostly this term. It is
#   about twice the most measured (``experiments/bench_coding.py``; docs/benchmarks.md).
RELATIVE_SLACK = 1e-3
FLUSH_BITS = 64
PER_SYMBOL_BITS = 2.0 ** -11


def max_bits(ideal: float, n: int) -> float:
    """The most a correct range code of n entries with this ideal length may take."""
    return ideal * (1 + RELATIVE_SLACK) + FLUSH_BITS + n * PER_SYMBOL_BITS


def ideal_bits(mask: np.ndarray, probs) -> float:
    """-sum log2 p(m_i) under the model ``encode`` uses (clipped per-entry keep-probabilities),
    in float64: the length a perfect coder would reach."""
    mask = np.asarray(mask).ravel()
    p = _probs(probs, mask.size)
    return float(-np.sum(np.log2(np.where(mask > 0, p, 1.0 - p))))


def ideal_global_bits(mask: np.ndarray) -> float:
    """The global code's ideal length: the count header and n entries at the mask's own f."""
    mask = np.asarray(mask).ravel()
    f = global_probability(int(mask.sum()), mask.size)
    return COUNT_BITS + ideal_bits(mask, f)


def check_masks(payload: np.ndarray, theta: np.ndarray, n: int) -> list[dict]:
    """Codes each bit-packed mask of ``payload`` ([masks, bytes]) both ways, decodes both
    streams and measures them: per mask ``{"lossless", "prior_bits", "global_bits",
    "ideal_prior", "ideal_global"}``. Numpy and constriction only, so that worker processes
    can run it without importing JAX."""
    theta = np.asarray(theta, np.float64)
    out = []
    for row in np.asarray(payload):
        mask = np.unpackbits(row)[:n]
        words_prior = encode(mask, theta)
        ones, words_global = encode_global(mask)
        lossless = (np.array_equal(decode(words_prior, theta, n), mask)
                    and np.array_equal(decode_global(ones, words_global, n), mask))
        out.append({"lossless": bool(lossless), "prior_bits": prior_bits(words_prior),
                    "global_bits": global_bits(words_global),
                    "ideal_prior": ideal_bits(mask, theta), "ideal_global": ideal_global_bits(mask)})
    return out
