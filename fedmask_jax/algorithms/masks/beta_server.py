"""FedPM's server: the clients' masks, smoothed (0 -> eps, 1 -> 1 - eps), are added to a
Beta(alpha, beta) posterior per entry, whose prior Beta(lambda0, lambda0) is reset every
``prior_reset_period`` rounds; the posterior mode theta_g is what the server broadcasts
(through the downlink) as its logit."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedmask_jax.algorithms.base import PyTree
from fedmask_jax.config import setting


@dataclasses.dataclass(frozen=True)
class BetaServerConfig:
    epsilon: float = setting(0.01, "Uplink mask smoothing 0 -> eps, 1 -> 1 - eps before aggregation.",
                             min=0, max=0.5, min_open=True, max_open=True, vary=True)
    lambda0: float = setting(1.0, "Server Beta prior alpha = beta = lambda0 (>= 1: the mode needs it).",
                             min=1.0, vary=True)
    prior_reset_period: int = setting(1, "Reset the server's Beta prior every this many rounds "
                                      "(1 = every round, the reference).", min=1, vary=True)


class FedPMHyper(NamedTuple):
    """The hyperparameters the round reads as values, so that runs differing in them can
    share one program (the ``vary=True`` settings of the server and of client training)."""

    client_lr: jax.Array
    epsilon: jax.Array
    lambda0: jax.Array
    prior_reset_period: jax.Array


class FedPMServerState(NamedTuple):
    frozen: PyTree  # the random weights, shared by everyone
    scores: PyTree  # what is broadcast: logit(theta_g), or of its compressed form
    alpha: PyTree
    beta: PyTree
    round: jax.Array
    key: jax.Array  # for a server-sampled broadcast mask
    hp: FedPMHyper


def server_init(variables: dict, key: jax.Array, config) -> FedPMServerState:
    """The state before round 1: the model's scores and frozen weights (``variables``), the
    prior as posterior; ``config`` has the server's settings and ``client_lr``."""
    scores = variables["params"]
    full = lambda v: jax.tree.map(lambda s: jnp.full_like(s, v), scores)  # noqa: E731
    return FedPMServerState(
        frozen=variables["frozen"], scores=scores, alpha=full(config.lambda0),
        beta=full(config.lambda0), round=jnp.zeros((), jnp.int32),
        key=jax.random.fold_in(key, 1),
        hp=FedPMHyper(jnp.float32(config.client_lr), jnp.float32(config.epsilon),
                      jnp.float32(config.lambda0), jnp.int32(config.prior_reset_period)),
    )


def server_update(server: FedPMServerState, mask_counts: PyTree, k: jax.Array,
                  compress_broadcast: Callable[[PyTree, jax.Array, jax.Array], PyTree]) -> FedPMServerState:
    """One round: ``mask_counts`` ones per entry among ``k`` (float) masks into the posterior;
    ``compress_broadcast(theta, key, epsilon)`` is what the clients receive in its place."""
    hp = server.hp
    reset = server.round % hp.prior_reset_period == 0
    prior = lambda p: jnp.where(reset, hp.lambda0, p)  # noqa: E731
    # sum_k v_k of the smoothed masks, from the count of ones among the K masks
    ones = jax.tree.map(lambda c: (1.0 - 2.0 * hp.epsilon) * c + hp.epsilon * k, mask_counts)
    alpha = jax.tree.map(lambda a, s: prior(a) + s, server.alpha, ones)
    beta = jax.tree.map(lambda b, s: prior(b) + (k - s), server.beta, ones)
    theta = jax.tree.map(lambda a, b: (a - 1.0) / (a + b - 2.0), alpha, beta)
    theta = compress_broadcast(theta, jax.random.fold_in(server.key, server.round), hp.epsilon)
    scores = jax.tree.map(lambda t: jnp.log(t) - jnp.log1p(-t), theta)
    return server._replace(scores=scores, alpha=alpha, beta=beta, round=server.round + 1)
