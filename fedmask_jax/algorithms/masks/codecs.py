"""Uplink codecs of mask methods: what a client sends for its trained scores, what it costs,
and what the server counts from it (in the spirit of ``compressors.Compressor``).

    encode(scores, broadcast, key) -> message    what leaves the client
    decode(message, broadcast, key) -> mask      the binary mask tree the server adds up
    bits(message) -> scalar                      the message's size as sent
    metrics(message, mask, scores, broadcast)    further per-client figures
    server_counts(counts, k) -> counts           the server's view of the sum of K masks

``scores`` are the client's trained scores, ``broadcast`` the scores it received (both
trees); ``key`` is the client's finish key, shared with the server where a codec needs
common randomness. A *binary-mask* codec's message is the mask itself (a tree shaped like
the scores): ``randomized_response`` wraps only those.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedmask_jax import coding, masking
from fedmask_jax.algorithms.base import PyTree


class MaskCodec(NamedTuple):
    name: str
    encode: Callable[[PyTree, PyTree, jax.Array], Any]
    decode: Callable[[Any, PyTree, jax.Array], PyTree]
    bits: Callable[[Any], jax.Array]
    metrics: Callable[[Any, PyTree, PyTree, PyTree], dict[str, jax.Array]]
    server_counts: Callable[[PyTree, jax.Array], PyTree] = lambda counts, k: counts
    binary: bool = False  # the message is the mask tree the server counts


def num_entries(tree: PyTree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def _ones(mask: PyTree) -> jax.Array:
    return sum(jnp.sum(m) for m in jax.tree.leaves(mask))


def binary_mask_bits(mask: PyTree) -> jax.Array:
    """The reference's count for a binary mask: n H_b(ones / n) + log2 n."""
    return masking.mask_bits(_ones(mask), num_entries(mask))


def binary_mask_metrics(mask: PyTree, broadcast: PyTree) -> dict[str, jax.Array]:
    """A sent binary mask's density and the exact lengths of its two range codes
    (``coding.py``), per entry."""
    n = num_entries(mask)
    ones = _ones(mask)
    return {
        "mask_density": ones / n,
        "uplink_bpp_coded_prior": sum(
            coded_bits_prior(m, s) for m, s in zip(jax.tree.leaves(mask), jax.tree.leaves(broadcast))) / n,
        "uplink_bpp_coded_global": coded_bits_global(ones, n) / n,
    }


def binary_mask_codec(name: str, mask_of: Callable[[jax.Array, jax.Array], jax.Array]) -> MaskCodec:
    """A codec sending one binary mask, ``mask_of(leaf key, scores leaf)`` per leaf, each leaf
    with its own key (``jax.random.split(key, leaves)``)."""

    def encode(scores, broadcast, key):
        leaves, treedef = jax.tree.flatten(scores)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [mask_of(k, s) for k, s in zip(keys, leaves)])

    def metrics(message, mask, scores, broadcast):
        return binary_mask_metrics(message, broadcast)

    return MaskCodec(name, encode, decode=lambda message, broadcast, key: message, bits=binary_mask_bits,
                     metrics=metrics, binary=True)


def sampled_mask() -> MaskCodec:
    """FedPM: one mask m ~ Bernoulli(sigmoid(s))."""
    return binary_mask_codec(
        "sampled_mask", lambda k, s: jax.random.bernoulli(k, jax.nn.sigmoid(s)).astype(jnp.float32))


def thresholded_mask() -> MaskCodec:
    """FedMask: the deterministic mask 1[s > 0]."""
    return binary_mask_codec("thresholded_mask", lambda k, s: masking.threshold_mask(s))


def packed_mask(mask: PyTree, num_params: int) -> jax.Array:
    """A binary mask tree, flattened and bit-packed (1 bit per entry): the uplink payload the
    host's coding check reads."""
    flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(mask)])
    chex.assert_shape(flat, (num_params,))
    return jnp.packbits(flat.astype(jnp.uint8))


def coded_bits_prior(mask: jax.Array, scores: jax.Array) -> jax.Array:
    """-sum log2 p(m_i | theta_i), theta = sigmoid(scores): the length of the range code with
    the broadcast as per-entry probability, as ``coding.encode(mask, theta)`` models it
    (probabilities clipped to [P_MIN, 1 - P_MIN] as there).

    1 - theta is exact in float32 for theta >= 1/2, so both tails keep their precision.
    """
    theta = jax.nn.sigmoid(scores)
    p = jnp.where(mask > 0, theta, 1.0 - theta)
    return -jnp.sum(jnp.log2(jnp.maximum(p, coding.P_MIN)))


def coded_bits_global(ones: jax.Array, n: int) -> jax.Array:
    """Length of the global code: a 32-bit count of ones, then every entry coded with the
    mask's own frequency f = ones / n (``coding.encode_global``)."""
    f = jnp.clip(ones / n, coding.P_MIN, 1.0 - coding.P_MIN)
    return coding.COUNT_BITS - ones * jnp.log2(f) - (n - ones) * jnp.log2(1.0 - f)
