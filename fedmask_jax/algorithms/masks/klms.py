"""KLMS uplink codec (Isik, Pase et al., AISTATS 2024; the authors' FedPM-KLMS): per block of
mask entries, candidates drawn from the broadcast Bernoulli(theta_g) with randomness the
server shares, one chosen by importance weight q/p (q: the client's trained
keep-probabilities), its index sent; the server regenerates the named candidate."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedmask_jax import models
from fedmask_jax.algorithms.masks.codecs import MaskCodec
from fedmask_jax.config import setting

KLMS_SHARED, KLMS_PRIVATE = 0x4B1, 0x4B2  # klms: fold_in(client finish key, this)
KLMS_MAX_BLOCK = 256  # adaptive blocks' largest size: each block's size costs 8 bits
_P_CLIP = 1e-6


@dataclasses.dataclass(frozen=True)
class KLMSCodecConfig:
    klms_adaptive: bool = setting(True, "klms: blocks grow until their KL(q||p) would pass "
                                  "--klms_kl_rate bits (at most 256 entries; each block's size sent "
                                  "in 8 bits); else fixed blocks of --klms_block_size.")
    klms_kl_rate: int = setting(2, "klms, adaptive: bits per block (2^this candidates).", min=1, max=16)
    klms_block_size: int = setting(8, "klms, fixed blocks: entries per block.", min=1)
    klms_samples_log2: int = setting(1, "klms, fixed blocks: bits per block (2^this candidates).",
                                     min=1, max=16)


def flat_probabilities(scores) -> jax.Array:
    flat_scores = jnp.concatenate([s.ravel() for s in jax.tree.leaves(scores)])
    return jnp.clip(jax.nn.sigmoid(flat_scores), _P_CLIP, 1.0 - _P_CLIP)


def kl_bits(q: jax.Array, p: jax.Array) -> jax.Array:
    """KL(Bernoulli(q) || Bernoulli(p)) per entry, in bits."""
    return (q * (jnp.log2(q) - jnp.log2(p)) + (1 - q) * (jnp.log2(1 - q) - jnp.log2(1 - p)))


class KLMSMessage(NamedTuple):
    """A klms uplink: one candidate index per block (entries past ``blocks`` are unused) and
    each entry's block (sent as the block sizes when adaptive; known to both ends if fixed)."""

    indices: jax.Array  # [n] int32
    block_of: jax.Array  # [n] int32
    blocks: jax.Array  # int32: number of blocks


def klms_blocks(q: jax.Array, p: jax.Array, cfg: KLMSCodecConfig) -> jax.Array:
    """Each entry's block: fixed blocks of ``klms_block_size``, or (adaptive) a block closes
    before the entry that would take its KL(q||p) above ``klms_kl_rate`` bits, or at 256
    entries (the authors' greedy rule; the entry that closes a block starts the next one with
    its own KL counted)."""
    n = q.shape[0]
    if not cfg.klms_adaptive:
        return (jnp.arange(n) // cfg.klms_block_size).astype(jnp.int32)

    def step(carry, kl):
        block, run_kl, size = carry
        close = (size > 0) & ((run_kl + kl > cfg.klms_kl_rate) | (size >= KLMS_MAX_BLOCK))
        block = block + close
        run_kl = jnp.where(close, kl, run_kl + kl)
        size = jnp.where(close, 1, size + 1)
        return (block, run_kl, size), block

    _, block_of = jax.lax.scan(step, (jnp.int32(0), jnp.float32(0.0), jnp.int32(0)), kl_bits(q, p))
    return block_of


def _klms_samples(cfg: KLMSCodecConfig) -> int:
    return 2 ** (cfg.klms_kl_rate if cfg.klms_adaptive else cfg.klms_samples_log2)


def _candidate(shared: jax.Array, j, p: jax.Array) -> jax.Array:
    """Candidate ``j`` for every block at once: entry i is 1 with probability p_i, drawn from
    randomness both ends derive from (round, client) -- one uniform per (candidate, entry)."""
    return (jax.random.uniform(jax.random.fold_in(shared, j), p.shape) < p).astype(jnp.float32)


def klms_encode(q: jax.Array, p: jax.Array, key: jax.Array, cfg: KLMSCodecConfig) -> KLMSMessage:
    """Minimal random coding per block: among 2^bits candidates drawn from Bernoulli(p), pick
    one with probability proportional to its importance weight prod q(x)/p(x) (the Gumbel-max
    trick, one candidate at a time, so memory stays O(entries))."""
    n = q.shape[0]
    block_of = klms_blocks(q, p, cfg)
    shared, private = jax.random.fold_in(key, KLMS_SHARED), jax.random.fold_in(key, KLMS_PRIVATE)
    log_one, log_zero = jnp.log(q) - jnp.log(p), jnp.log1p(-q) - jnp.log1p(-p)

    def body(j, carry):
        best, index = carry
        x = _candidate(shared, j, p)
        log_w = jax.ops.segment_sum(jnp.where(x > 0, log_one, log_zero), block_of, num_segments=n)
        score = log_w + jax.random.gumbel(jax.random.fold_in(private, j), (n,))
        better = score > best
        return jnp.where(better, score, best), jnp.where(better, j, index)

    init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,), jnp.int32))
    _, indices = jax.lax.fori_loop(0, _klms_samples(cfg), body, init)
    return KLMSMessage(indices, block_of, block_of[-1] + 1)


def klms_decode(message: KLMSMessage, p: jax.Array, key: jax.Array, cfg: KLMSCodecConfig) -> jax.Array:
    """The server's mask: in each block, the candidate its index names, regenerated from the
    shared randomness and the broadcast p."""
    shared = jax.random.fold_in(key, KLMS_SHARED)
    chosen = message.indices[message.block_of]

    def body(j, mask):
        return jnp.where(chosen == j, _candidate(shared, j, p), mask)

    return jax.lax.fori_loop(0, _klms_samples(cfg), body, jnp.zeros_like(p))


def klms_bits(message: KLMSMessage, cfg: KLMSCodecConfig) -> jax.Array:
    """Bits of the message: each block's index (log2 of the candidates), plus, when the
    blocks are adaptive, each block's size (log2 256 = 8 bits; the authors' count)."""
    per_block = (cfg.klms_kl_rate + math.log2(KLMS_MAX_BLOCK)) if cfg.klms_adaptive else cfg.klms_samples_log2
    return message.blocks.astype(jnp.float32) * per_block


def klms_codec(cfg: KLMSCodecConfig) -> MaskCodec:
    """The codec over score trees: q from the client's scores, p from the broadcast."""

    def encode(scores, broadcast, key):
        return klms_encode(flat_probabilities(scores), flat_probabilities(broadcast), key, cfg)

    def decode(message, broadcast, key):
        return models.unflat_like(klms_decode(message, flat_probabilities(broadcast), key, cfg), broadcast)

    def metrics(message, mask, scores, broadcast):
        q, p = flat_probabilities(scores), flat_probabilities(broadcast)
        flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(mask)])
        n = flat.shape[0]
        return {
            "klms_kl_bpp": jnp.sum(kl_bits(q, p)) / n,  # the realised KL(q || p)
            "klms_blocks": message.blocks.astype(jnp.float32),
            "mask_density": jnp.sum(flat) / n,
        }

    return MaskCodec("klms", encode, decode, lambda message: klms_bits(message, cfg), metrics)
