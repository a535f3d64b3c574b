"""What the server broadcasts in place of theta_g (its posterior stays exact), and its bits."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedmask_jax import masking
from fedmask_jax.algorithms.base import PyTree
from fedmask_jax.config import setting

DOWNLINKS = ("float32", "quantized", "sampled_mask")


@dataclasses.dataclass(frozen=True)
class DownlinkConfig:
    downlink: str = setting("float32", "Server broadcast: float32 scores (32 bpp), theta_g quantised "
                            "to --downlink_bits, or one sampled mask.", choices=DOWNLINKS)
    downlink_bits: int = setting(4, "Bits per entry for --downlink=quantized.", min=1, max=16)


class Downlink(NamedTuple):
    # (theta tree, server key of the round, epsilon) -> the theta tree the clients receive
    compress_broadcast: Callable[[PyTree, jax.Array, jax.Array], PyTree]
    # the broadcast scores -> bits of the broadcast they came from
    downlink_bits: Callable[[PyTree], jax.Array]


def float32(num_params: int) -> Downlink:
    """theta_g itself: 32 bits per entry."""
    return Downlink(lambda theta, key, epsilon: theta, lambda scores: jnp.float32(32 * num_params))


def quantized(bits: int, num_params: int) -> Downlink:
    """theta_g at the mid-points of 2**bits equal bins of [0, 1]: ``bits`` per entry."""
    levels = 2 ** bits

    def compress_broadcast(theta, key, epsilon):
        return jax.tree.map(lambda t: (jnp.clip(jnp.floor(t * levels), 0, levels - 1) + 0.5) / levels, theta)

    return Downlink(compress_broadcast, lambda scores: jnp.float32(bits * num_params))


def sampled_mask(num_params: int) -> Downlink:
    """One mask sampled from theta_g (each leaf with its own key split from the round's),
    smoothed like an uplink mask; its ideal size."""

    def compress_broadcast(theta, key, epsilon):
        leaves, treedef = jax.tree.flatten(theta)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [
            masking.smooth_mask(jax.random.bernoulli(k, t).astype(jnp.float32), epsilon)
            for k, t in zip(keys, leaves)])

    def downlink_bits(scores):
        ones = sum(jnp.sum(jax.nn.sigmoid(s) > 0.5) for s in jax.tree.leaves(scores)).astype(jnp.float32)
        return masking.mask_bits(ones, num_params)

    return Downlink(compress_broadcast, downlink_bits)


def downlink(config: DownlinkConfig, num_params: int) -> Downlink:
    """The downlink ``--downlink`` names."""
    if config.downlink == "quantized":
        return quantized(config.downlink_bits, num_params)
    if config.downlink == "sampled_mask":
        return sampled_mask(num_params)
    return float32(num_params)
