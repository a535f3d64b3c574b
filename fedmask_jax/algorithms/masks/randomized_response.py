"""Randomized response (local DP) around a binary-mask codec: each entry of what leaves the
client is flipped with probability 1/(1+e^eps), and the server debiases its counts. The
accounting is ``privacy.py``'s (a host hook)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedmask_jax import privacy
from fedmask_jax.algorithms.masks.codecs import MaskCodec
from fedmask_jax.config import check, setting

RR_STREAM = 0x22  # randomized response's flips: fold_in(a mask leaf's sampling key, this)


@dataclasses.dataclass(frozen=True)
class RandomizedResponseConfig:
    mask_rr_epsilon: float = setting(
        0.0, "Local DP: flip each uplink mask entry with probability 1/(1+e^eps) (randomized "
        "response, eps per entry); the server debiases the counts (0 = off).", min=0)
    dp_delta: float = privacy.dp_delta_setting()
    target_epsilon: float = privacy.target_epsilon_setting()

    def __post_init__(self):
        check(self)
        self.check_randomized_response()

    def check_randomized_response(self):
        if self.target_epsilon > 0 and self.mask_rr_epsilon == 0:
            raise ValueError("--target_epsilon needs --mask_rr_epsilon > 0 for a mask method: without "
                             "randomized response there is no finite epsilon")


def randomized_response(key: jax.Array, mask: jax.Array, flip: float) -> jax.Array:
    """Each entry of a binary mask flipped independently with probability ``flip``."""
    return jnp.abs(mask - jax.random.bernoulli(key, flip, mask.shape).astype(mask.dtype))


def debias_counts(counts: jax.Array, k: jax.Array, flip: float) -> jax.Array:
    """Unbiased estimate of the number of ones among K masks from the count of ones among
    their randomized-response copies: E[count] = c (1 - 2 flip) + K flip."""
    return (counts - k * flip) / (1.0 - 2.0 * flip)


def with_randomized_response(inner: MaskCodec, epsilon: float) -> MaskCodec:
    """``inner``'s mask, each entry flipped with probability 1/(1+e^epsilon) before it leaves
    the client (leaf i's flips from fold_in(leaf i's key, RR_STREAM), the leaf keys split
    from the finish key as a binary codec splits them); the server's counts are debiased
    and clipped to [0, K]. The flipped mask is the message: its bits and code lengths are
    the inner codec's, of the flipped mask."""
    if not inner.binary:
        raise ValueError(f"randomized response flips a binary mask; the {inner.name} codec sends none")
    flip = privacy.flip_probability(epsilon)

    def encode(scores, broadcast, key):
        masks, treedef = jax.tree.flatten(inner.encode(scores, broadcast, key))
        keys = jax.random.split(key, len(masks))
        return jax.tree.unflatten(treedef, [
            randomized_response(jax.random.fold_in(k, RR_STREAM), m, flip) for k, m in zip(keys, masks)])

    def server_counts(counts, k):  # unbiased counts of the masks before their flips, within [0, K]
        counts = inner.server_counts(counts, k)
        return jax.tree.map(lambda c: jnp.clip(debias_counts(c, k, flip), 0.0, k), counts)

    return inner._replace(name=f"rr_{inner.name}", encode=encode, server_counts=server_counts)
