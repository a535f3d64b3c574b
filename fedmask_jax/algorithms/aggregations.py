"""Server aggregations of the dense methods: how the clients' decoded updates become the
aggregate the server optimizer steps on.

Each aggregation is a small bundle of pure functions (like a ``Compressor``, and in the
spirit of optax's ``GradientTransformation``):

    init() -> state                              kept in the server state across rounds
    client(update, norm, state) -> (update, side, metrics)
        on the client, before the uplink compressor: the update to compress, what the client
        adds to the cohort's sum besides its decoded message, and metrics to report;
        ``norm`` is the update's L2 norm, which the method computes for its metrics anyway
    server(decoded_sum, side_sum, state, key, num_clients) -> (aggregate, state)
        on the server: ``key`` is the round's server key (each aggregation folds in its own
        stream), ``num_clients`` the reporting clients' count

``mean()`` and ``majority_vote()`` are the plain ones; ``differentially_private(inner, ...)``
wraps any aggregation with DP-FedAvg's clipping and noise (McMahan et al. 2018), as optax's
``differentially_private_aggregate`` is one more transform and ``error_feedback`` wraps a
compressor: the method's core knows nothing of privacy.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

DP_NOISE_STREAM = 0xD9  # the server's DP noise: fold_in(fold_in(server key, round), this)


class Aggregation(NamedTuple):
    name: str
    init: Callable[[], Any]
    client: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any, dict]]
    server: Callable[[jax.Array, Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def _plain(name: str, combine: Callable[[jax.Array, jax.Array], jax.Array]) -> Aggregation:
    return Aggregation(name, lambda: (), lambda u, norm, state: (u, (), {}),
                       lambda total, side, state, key, n: (combine(total, n), state))


def mean() -> Aggregation:
    """FedAvg's unweighted mean of the decoded updates."""
    return _plain("mean", lambda total, n: total / n)


def majority_vote() -> Aggregation:
    """SignSGD's majority vote: the sign of the sum of the decoded messages."""
    return _plain("majority_vote", lambda total, n: jnp.sign(total))


PLAIN = {"mean": mean, "majority_vote": majority_vote}


class PrivateState(NamedTuple):
    clip: jax.Array  # this round's clip norm
    inner: Any


def differentially_private(inner: Aggregation, clip: float, update_noise_multiplier: float,
                           count_noise: bool, clip_quantile: float = 0.0, clip_lr: float = 0.2,
                           count_stddev: float = 0.0) -> Aggregation:
    """DP-FedAvg around ``inner``: each client's update clipped to the clip norm, Gaussian
    noise of std ``update_noise_multiplier`` x clip on the clipped updates' sum, then
    ``inner``'s aggregate of the noised sum. With ``clip_quantile`` > 0 the clip norm moves
    geometrically towards that quantile of the clients' update norms (Andrew et al. 2021),
    the count of unclipped clients noised with std ``count_stddev`` when ``count_noise``."""

    def init():
        return PrivateState(jnp.float32(clip), inner.init())

    def client(u, norm, state):
        unclipped = (norm <= state.clip).astype(jnp.float32)
        scale = jnp.minimum(1.0, state.clip / jnp.maximum(norm, 1e-30))
        u, side, metrics = inner.client(u * scale, norm * scale, state.inner)
        metrics = {**metrics, "dp_clip_norm": state.clip, "clipped_fraction": 1.0 - unclipped}
        return u, (unclipped, side), metrics

    def server(total, side, state, key, num_clients):
        unclipped_count, inner_side = side
        k_sum, k_count = jax.random.split(jax.random.fold_in(key, DP_NOISE_STREAM))
        std = update_noise_multiplier * state.clip
        noised = total + std * jax.random.normal(k_sum, total.shape, total.dtype)
        next_clip = state.clip
        if clip_quantile > 0:  # geometric update towards the target quantile
            count = unclipped_count
            if count_noise:
                count = count + count_stddev * jax.random.normal(k_count, ())
            next_clip = next_clip * jnp.exp(-clip_lr * (count / num_clients - clip_quantile))
        aggregate, inner_state = inner.server(noised, inner_side, state.inner, key, num_clients)
        return aggregate, PrivateState(next_clip, inner_state)

    return Aggregation(f"dp_{inner.name}", init, client, server)
