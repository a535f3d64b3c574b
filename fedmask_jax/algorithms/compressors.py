"""Uplink compressors for model updates: what a client sends, and what it costs in bits.

Each compressor is a small bundle of pure functions over a *flat* float32 update vector
(in the spirit of optax's ``GradientTransformation``):

    init(num_params) -> state                 client memory kept across rounds (() if none)
    encode(update, state, key) -> (message, state)
    decode(message, key) -> update estimate   what the server reconstructs from the message
    bits(message) -> scalar                   the message's size as it would be sent

``key`` is randomness both ends share (e.g. DRIVE's rotation); stochastic rounding draws
from it too, which is harmless because the server never needs to redraw it. The message is
a dict of arrays holding exactly what goes on the wire, so ``bits`` is computed from the
message itself, never from the update it came from.

``error_feedback(c)`` wraps any compressor with a per-client residual memory (Stich et al.
2018; Karimireddy et al. 2019): the client compresses ``update + memory`` and keeps what the
message failed to carry.

Arguments are not checked here: the method configs (``fedavg.py``) bound every setting a
compressor takes, and report a bad one by its flag before anything is built.

Layers: some methods scale per layer. Their constructor takes ``segments``, the sizes of the
layers in the flat vector's order (``jax.tree.leaves`` order of the parameter tree).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Message = dict[str, jax.Array]


class Compressor(NamedTuple):
    name: str
    init: Callable[[int], Any]
    encode: Callable[[jax.Array, Any, jax.Array], tuple[Message, Any]]
    decode: Callable[[Message, jax.Array], jax.Array]
    bits: Callable[[Message], jax.Array]


FLOAT_BITS = 32


def _stateless(name, encode, decode, bits) -> Compressor:
    return Compressor(name, lambda n: (), lambda u, s, k: (encode(u, k), s), decode, bits)


def _segment_ids(segments: Sequence[int]) -> np.ndarray:
    return np.repeat(np.arange(len(segments)), segments).astype(np.int32)


def identity() -> Compressor:
    """FedAvg: the update as 32-bit floats."""
    return _stateless(
        "identity",
        lambda u, k: {"values": u},
        lambda m, k: m["values"],
        lambda m: jnp.float32(FLOAT_BITS * m["values"].size),
    )


def sign() -> Compressor:
    """SignSGD (Bernstein et al. 2018): one bit per entry, sign(0) sent as +1, no scale."""
    return _stateless(
        "sign",
        lambda u, k: {"signs": jnp.where(u >= 0, 1, -1).astype(jnp.int8)},
        lambda m, k: m["signs"].astype(jnp.float32),
        lambda m: jnp.float32(m["signs"].size),
    )


def scaled_sign(segments: Sequence[int]) -> Compressor:
    """Signs with one scale per layer, ||p_l||_1 / d_l (the EF-SignSGD compressor of
    Karimireddy et al. 2019, applied layer-wise): n + 32 * layers bits."""
    seg = jnp.asarray(_segment_ids(segments))
    sizes = jnp.asarray(segments, jnp.float32)
    nseg = len(segments)

    def encode(u, key):
        scale = jax.ops.segment_sum(jnp.abs(u), seg, nseg) / sizes
        return {"signs": jnp.where(u >= 0, 1, -1).astype(jnp.int8), "scales": scale}

    def decode(m, key):
        return m["signs"].astype(jnp.float32) * m["scales"][seg]

    return _stateless("scaled_sign", encode, decode,
                      lambda m: jnp.float32(m["signs"].size + FLOAT_BITS * m["scales"].size))


def top_k(fraction: float, num_params: int) -> Compressor:
    """The k = ceil(fraction * n) largest-magnitude entries: k values (32 bits) and k
    positions (ceil(log2 n) bits each); ``fraction`` in (0, 1]."""
    k = max(1, math.ceil(fraction * num_params))
    position_bits = max(1, math.ceil(math.log2(num_params)))

    def encode(u, key):
        _, idx = jax.lax.top_k(jnp.abs(u), k)
        return {"values": u[idx], "positions": idx.astype(jnp.int32)}

    def decode(m, key):
        return jnp.zeros(num_params, jnp.float32).at[m["positions"]].set(m["values"])

    return _stateless("top_k", encode, decode,
                      lambda m: jnp.float32(m["values"].size * (FLOAT_BITS + position_bits)))


def _floor_log2(n: jax.Array) -> jax.Array:
    return 31 - jax.lax.clz(n.astype(jnp.int32))


def elias_omega_bits(n: jax.Array) -> jax.Array:
    """Length in bits of the Elias omega code of each positive integer in ``n`` -- the
    recursive "Elias(k)" integer code of QSGD's Code_s (Alistarh et al. 2017, section 3.2).

    omega(1) = "0"; otherwise the binary of n is preceded by omega(floor(log2 n)).
    """
    n = n.astype(jnp.int32)
    length = jnp.ones_like(n)
    for _ in range(5):  # 2**31 -> 31 -> 4 -> 2 -> 1: at most four prefixes for int32
        more = n > 1
        length = length + jnp.where(more, _floor_log2(jnp.maximum(n, 1)) + 1, 0)
        n = jnp.where(more, _floor_log2(jnp.maximum(n, 1)), n)
    return length


def qsgd(levels: int, bucket: int, num_params: int) -> Compressor:
    """QSGD (Alistarh et al. 2017) with ``levels`` = s quantisation levels per bucket.

    Each bucket of ``bucket`` entries is scaled by its L2 norm and stochastically rounded to
    {0, 1/s, ..., 1}. Bits are those of the paper's Code_s, counted on the actual message:
    32 bits per bucket norm, then for each non-zero entry the Elias code of its distance to
    the previous non-zero, one sign bit and the Elias code of its level. ``levels`` and
    ``bucket`` >= 1.
    """
    nb = -(-num_params // bucket)
    pad = nb * bucket - num_params

    def encode(u, key):
        v = jnp.pad(u, (0, pad)).reshape(nb, bucket)
        norm = jnp.linalg.norm(v, axis=1, keepdims=True)
        r = jnp.abs(v) / jnp.where(norm > 0, norm, 1.0) * levels
        low = jnp.floor(r)
        level = low + (jax.random.uniform(key, v.shape) < r - low)
        signed = (jnp.sign(v) * level).astype(jnp.int32).reshape(-1)[:num_params]
        return {"norms": norm[:, 0], "levels": signed}

    def decode(m, key):
        scale = jnp.repeat(m["norms"], bucket)[:num_params] / levels
        return m["levels"].astype(jnp.float32) * scale

    def bits(m):
        q = m["levels"]
        nonzero = q != 0
        idx = jnp.arange(q.size, dtype=jnp.int32)
        last = jax.lax.cummax(jnp.where(nonzero, idx, -1))
        previous = jnp.concatenate([jnp.full((1,), -1, jnp.int32), last[:-1]])
        per_entry = elias_omega_bits(jnp.maximum(idx - previous, 1)) + 1 + elias_omega_bits(
            jnp.maximum(jnp.abs(q), 1))
        return (FLOAT_BITS * m["norms"].size + jnp.sum(jnp.where(nonzero, per_entry, 0))).astype(
            jnp.float32)

    return _stateless("qsgd", encode, decode, bits)


def terngrad(segments: Sequence[int]) -> Compressor:
    """TernGrad (Wen et al. 2017): per layer s = max|g|, entries s * sign(g) * Bernoulli(|g|/s),
    sent as 2 bits per entry plus one 32-bit scale per layer."""
    seg = jnp.asarray(_segment_ids(segments))
    nseg = len(segments)

    def encode(u, key):
        scale = jax.ops.segment_max(jnp.abs(u), seg, nseg)
        s = scale[seg]
        keep = jax.random.uniform(key, u.shape) < jnp.abs(u) / jnp.where(s > 0, s, 1.0)
        return {"ternary": (jnp.sign(u) * keep).astype(jnp.int8), "scales": scale}

    def decode(m, key):
        return m["ternary"].astype(jnp.float32) * m["scales"][seg]

    return _stateless("terngrad", encode, decode,
                      lambda m: jnp.float32(2 * m["ternary"].size + FLOAT_BITS * m["scales"].size))


def fwht(x: jax.Array) -> jax.Array:
    """Unnormalised fast Walsh-Hadamard transform along the last axis (length a power of 2)."""
    *lead, d = x.shape
    h = 1
    while h < d:
        y = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
        h *= 2
    return x


class _Rotation(NamedTuple):
    """Randomized Hadamard rotations over chunks of a flat vector (DRIVE, EDEN)."""

    groups: list[tuple[int, int]]  # (number of chunks, chunk size)
    split: Callable[[jax.Array], list[jax.Array]]  # vector -> [chunks, size] per group
    diagonals: Callable[[jax.Array], list[jax.Array]]  # shared key -> random signs per group


def _rotation(chunk: int, num_params: int) -> _Rotation:
    """Chunks of ``chunk`` entries (a power of 2 >= 2); the entries left over after the full
    chunks form one last chunk, zero-padded to the next power of 2."""
    full, tail = divmod(num_params, chunk)
    tail_size = 1 << max(1, math.ceil(math.log2(tail))) if tail else 0
    groups = [(n, d) for n, d in ((full, chunk), (1 if tail else 0, tail_size)) if n]

    def split(u):
        parts = [u[: full * chunk].reshape(full, chunk)] if full else []
        if tail:
            parts.append(jnp.pad(u[full * chunk:], (0, tail_size - tail))[None])
        return parts

    def diagonals(key):
        return [jnp.where(jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, (n, d)), 1.0, -1.0)
                for i, (n, d) in enumerate(groups)]

    return _Rotation(groups, split, diagonals)


def lloyd_max_normal(levels: int, iterations: int = 500) -> np.ndarray:
    """The ``levels`` centroids of the Lloyd-Max quantizer of a standard normal (float64):
    each centroid the conditional mean of its cell, each boundary the midpoint of two."""
    from scipy.stats import norm

    c = norm.ppf((np.arange(levels) + 0.5) / levels)
    for _ in range(iterations):
        t = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
        c = (norm.pdf(t[:-1]) - norm.pdf(t[1:])) / (norm.cdf(t[1:]) - norm.cdf(t[:-1]))
    return c


def eden(bits: int, chunk: int, num_params: int) -> Compressor:
    """EDEN (Vargaftik et al., ICML 2022), integer ``bits`` per entry, over chunks of ``chunk``.

    Each chunk x is rotated as in DRIVE, y = H D x / sqrt(d); its entries, normalised to
    y * sqrt(d) / ||x|| (close to standard normal after the rotation), are quantised to the
    nearest of the 2^bits Lloyd-Max centroids of N(0, 1); the client sends the centroid
    indices and the scale S = ||x||^2 / <y, q> (q: the chosen centroids), which makes the
    estimate unbiased over the rotation; the server returns S * D H q / sqrt(d). At one bit
    the centroids are +-c and this is DRIVE. Bits: ``bits`` (1 to 8) per rotated entry plus 32
    per scale.
    """
    rot = _rotation(chunk, num_params)
    centroids = lloyd_max_normal(2 ** bits)
    table = jnp.asarray(centroids, jnp.float32)
    boundaries = jnp.asarray((centroids[1:] + centroids[:-1]) / 2, jnp.float32)

    def encode(u, key):
        indices, scales = [], []
        for x, diag in zip(rot.split(u), rot.diagonals(key)):
            d = x.shape[1]
            y = fwht(x * diag) / math.sqrt(d)
            norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
            index = jnp.searchsorted(boundaries, y * math.sqrt(d) / jnp.where(norm > 0, norm, 1.0))
            dot = jnp.sum(y * table[index], axis=1)
            scales.append(jnp.where(dot > 0, norm[:, 0] ** 2 / jnp.where(dot > 0, dot, 1.0), 0.0))
            indices.append(index.astype(jnp.uint8).reshape(-1))
        return {"levels": jnp.concatenate(indices), "scales": jnp.concatenate(scales)}

    def decode(m, key):
        out, start, first = [], 0, 0
        for (n, d), diag in zip(rot.groups, rot.diagonals(key)):
            q = table[m["levels"][start:start + n * d].astype(jnp.int32)].reshape(n, d)
            scale = m["scales"][first:first + n, None]
            out.append((fwht(q) / math.sqrt(d) * diag * scale).reshape(-1))
            start, first = start + n * d, first + n
        return jnp.concatenate(out)[:num_params]

    return _stateless("eden", encode, decode,
                      lambda m: jnp.float32(bits * m["levels"].size + FLOAT_BITS * m["scales"].size))


def drive(chunk: int, num_params: int) -> Compressor:
    """DRIVE (Vargaftik et al. 2021), unbiased variant, over chunks of ``chunk`` entries.

    Each chunk x is rotated, y = H D x / sqrt(d) (Hadamard H, random signs D from the shared
    key); the client sends sign(y) and S = ||x||^2 / ||y||_1; the server returns
    S * D H sign(y) / sqrt(d). The entries left over after the full chunks form one last
    chunk, zero-padded to the next power of 2. Bits: one per rotated entry plus 32 per scale.
    """
    rot = _rotation(chunk, num_params)

    def encode(u, key):
        signs, scales = [], []
        for x, diag in zip(rot.split(u), rot.diagonals(key)):
            y = fwht(x * diag) / math.sqrt(x.shape[1])
            l1 = jnp.sum(jnp.abs(y), axis=1)
            scales.append(jnp.sum(x * x, axis=1) / jnp.where(l1 > 0, l1, 1.0))
            signs.append(jnp.where(y >= 0, 1, -1).astype(jnp.int8).reshape(-1))
        return {"signs": jnp.concatenate(signs), "scales": jnp.concatenate(scales)}

    def decode(m, key):
        out, start, first = [], 0, 0
        for (n, d), diag in zip(rot.groups, rot.diagonals(key)):
            s = m["signs"][start:start + n * d].reshape(n, d).astype(jnp.float32)
            scale = m["scales"][first:first + n, None]
            out.append((fwht(s) / math.sqrt(d) * diag * scale).reshape(-1))
            start, first = start + n * d, first + n
        return jnp.concatenate(out)[:num_params]

    return _stateless("drive", encode, decode,
                      lambda m: jnp.float32(m["signs"].size + FLOAT_BITS * m["scales"].size))


def error_feedback(inner: Compressor) -> Compressor:
    """Compresses update + residual and keeps the part the message did not carry."""

    def encode(u, memory, key):
        corrected = u + memory
        message, _ = inner.encode(corrected, (), key)
        return message, corrected - inner.decode(message, key)

    return Compressor(f"ef_{inner.name}", lambda n: jnp.zeros((n,), jnp.float32), encode,
                      inner.decode, inner.bits)
