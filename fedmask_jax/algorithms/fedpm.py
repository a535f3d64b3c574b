"""FedPM: federated probabilistic masks with Bayesian (Beta) aggregation (Isik et al., 2023).

Clients train real scores s over frozen random weights with Adam; each uploads one binary
mask m ~ Bernoulli(sigmoid(s)). The server smooths the masks (0 -> eps, 1 -> 1 - eps), adds
them to a Beta(alpha, beta) posterior per entry and broadcasts the mode's logit. Defaults
follow the authors' code (DESIGN section 2).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmask_jax import masking
from fedmask_jax.algorithms.base import Batch, ClientResult, FederatedAlgorithm, PyTree
from fedmask_jax.models import count_entries


@dataclasses.dataclass(frozen=True)
class FedPMConfig:
    client_lr: float = 0.1
    epsilon: float = 0.01  # mask smoothing before aggregation
    lambda0: float = 1.0  # Beta prior alpha = beta = lambda0
    prior_reset_period: int = 1  # reset the prior every this many rounds (1 = reference)
    persistent_optimizer: bool = False  # keep each client's Adam state across its rounds
    downlink: str = "float32"  # float32 | quantized | sampled_mask: what the server broadcasts
    downlink_bits: int = 4  # for downlink="quantized": theta_g on 2**bits levels
    # FedMask-style: train and send the deterministic mask 1[s > 0] instead of a sample.
    deterministic: bool = False

    def __post_init__(self):
        if self.downlink not in DOWNLINKS:
            raise ValueError(f"--downlink={self.downlink!r} is unknown; allowed: {', '.join(DOWNLINKS)}")
        if not 1 <= self.downlink_bits <= 16:
            raise ValueError(f"--downlink_bits must be in 1..16, got {self.downlink_bits}")
        if not 0.0 < self.epsilon < 0.5:
            raise ValueError(f"--epsilon must be in (0, 0.5), got {self.epsilon}")
        if self.lambda0 < 1.0:
            raise ValueError(f"--lambda0 must be >= 1 (the Beta mode needs it), got {self.lambda0}")
        if self.prior_reset_period < 1:
            raise ValueError(
                f"--prior_reset_period must be >= 1, got {self.prior_reset_period}"
            )
        if self.client_lr <= 0:
            raise ValueError(f"--client_lr must be > 0, got {self.client_lr}")


DOWNLINKS = ("float32", "quantized", "sampled_mask")


class FedPMServerState(NamedTuple):
    frozen: PyTree  # the random weights, shared by everyone
    scores: PyTree  # what is broadcast: logit(theta_g), or of its compressed form
    alpha: PyTree
    beta: PyTree
    round: jax.Array
    key: jax.Array  # for a server-sampled broadcast mask


class FedPMClientState(NamedTuple):
    scores: PyTree
    opt_state: optax.OptState


def init_model_variables(model: nn.Module, sample_x: jax.Array, key: jax.Array) -> dict:
    """Scores and frozen weights from one key -- how a saved model rebuilds its weights."""
    k_scores, k_frozen, k_mask = jax.random.split(key, 3)
    return model.init({"params": k_scores, "frozen": k_frozen, "mask": k_mask}, sample_x)


def server_key(seed: int) -> jax.Array:
    """The key ``server_init`` gets in a run with this seed."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def fedmask(model: nn.Module, sample_x: jax.Array, config: FedPMConfig) -> FederatedAlgorithm:
    """FedMask-style deterministic masks (Li et al. 2021) in FedPM's frame, its closest baseline.

    Clients train scores on the same frozen weights through the mask 1[sigmoid(s) > 0.5]
    (straight-through gradient to sigmoid(s)) and send that mask; the server averages the
    (epsilon-smoothed) masks -- FedPM's aggregation with lambda0 = 1 and a reset every round --
    and broadcasts the logit. The only difference from FedPM is where randomness sits: none
    in FedMask's forward pass or message.
    """
    return fedpm(model.clone(mask_mode="threshold_ste"), sample_x,
                 dataclasses.replace(config, deterministic=True), name="fedmask")


def fedpm(model: nn.Module, sample_x: jax.Array, config: FedPMConfig,
          name: str = "fedpm") -> FederatedAlgorithm:
    """Builds FedPM for a masked Flax ``model``; ``sample_x`` is one input batch for shapes."""
    optimizer = optax.adam(config.client_lr)
    thresholded = model.clone(mask_mode="threshold")

    def init_variables(key):
        return init_model_variables(model, sample_x, key)

    shapes = jax.eval_shape(init_variables, jax.random.key(0))
    num_params = count_entries(shapes["params"])

    def server_init(key):
        variables = init_variables(key)
        scores = variables["params"]
        full = lambda v: jax.tree.map(lambda s: jnp.full_like(s, v), scores)  # noqa: E731
        return FedPMServerState(
            frozen=variables["frozen"], scores=scores, alpha=full(config.lambda0),
            beta=full(config.lambda0), round=jnp.zeros((), jnp.int32),
            key=jax.random.fold_in(key, 1),
        )

    def persistent_init():
        if not config.persistent_optimizer:
            return ()
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
        return optimizer.init(zeros)

    def client_init(server, persistent):
        opt_state = persistent if config.persistent_optimizer else optimizer.init(server.scores)
        return FedPMClientState(server.scores, opt_state)

    def loss_fn(scores, frozen, batch: Batch, key):
        logits = model.apply({"params": scores, "frozen": frozen}, batch.x, rngs={"mask": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        return jnp.sum(ce * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)

    def client_step(server, state: FedPMClientState, batch: Batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state.scores, server.frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.scores)
        return FedPMClientState(optax.apply_updates(state.scores, updates), opt_state), loss

    def client_finish(server, state: FedPMClientState, persistent, num_examples, key):
        leaves, treedef = jax.tree.flatten(state.scores)
        keys = jax.random.split(key, len(leaves))
        if config.deterministic:
            masks = [masking.threshold_mask(s) for s in leaves]
        else:
            masks = [jax.random.bernoulli(k, jax.nn.sigmoid(s)).astype(jnp.float32)
                     for k, s in zip(keys, leaves)]
        ones = sum(jnp.sum(m) for m in masks)
        metrics = {
            "uplink_bits": masking.mask_bits(ones, num_params),
            "mask_density": ones / num_params,
        }
        kept = state.opt_state if config.persistent_optimizer else persistent
        return ClientResult(jax.tree.unflatten(treedef, masks), kept, metrics)

    def server_update(server: FedPMServerState, mask_counts, num_clients):
        k = num_clients.astype(jnp.float32)
        reset = server.round % config.prior_reset_period == 0
        prior = lambda p: jnp.where(reset, config.lambda0, p)  # noqa: E731
        # sum_k v_k of the smoothed masks, from the count of ones among the K masks
        ones = jax.tree.map(
            lambda c: (1.0 - 2.0 * config.epsilon) * c + config.epsilon * k, mask_counts
        )
        alpha = jax.tree.map(lambda a, s: prior(a) + s, server.alpha, ones)
        beta = jax.tree.map(lambda b, s: prior(b) + (k - s), server.beta, ones)
        theta = jax.tree.map(lambda a, b: (a - 1.0) / (a + b - 2.0), alpha, beta)
        theta = compress_broadcast(theta, jax.random.fold_in(server.key, server.round))
        scores = jax.tree.map(lambda t: jnp.log(t) - jnp.log1p(-t), theta)
        return server._replace(scores=scores, alpha=alpha, beta=beta, round=server.round + 1)

    def compress_broadcast(theta, key):
        """What the clients receive in place of theta_g (the posterior stays exact)."""
        if config.downlink == "quantized":  # mid-points of 2**bits equal bins of [0, 1]
            levels = 2 ** config.downlink_bits
            return jax.tree.map(
                lambda t: (jnp.clip(jnp.floor(t * levels), 0, levels - 1) + 0.5) / levels, theta)
        if config.downlink == "sampled_mask":  # one binary mask, smoothed like an uplink mask
            leaves, treedef = jax.tree.flatten(theta)
            keys = jax.random.split(key, len(leaves))
            return jax.tree.unflatten(treedef, [
                masking.smooth_mask(jax.random.bernoulli(k, t).astype(jnp.float32), config.epsilon)
                for k, t in zip(keys, leaves)])
        return theta

    def evaluate(server: FedPMServerState, batch: Batch, key):
        variables = {"params": server.scores, "frozen": server.frozen}
        logits_thr = thresholded.apply(variables, batch.x)
        # A deterministic-mask model is its thresholded network; FedPM samples one mask.
        logits = logits_thr if config.deterministic else model.apply(
            variables, batch.x, rngs={"mask": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        hit = lambda lg: jnp.sum((jnp.argmax(lg, -1) == batch.y) * batch.mask)  # noqa: E731
        return {
            "test_loss": jnp.sum(ce * batch.mask),
            "test_accuracy": hit(logits),
            "test_accuracy_thresholded": hit(logits_thr),
        }

    def uplink_payload(mask_tree):
        """The client's binary mask, flattened and bit-packed (1 bit per entry)."""
        flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(mask_tree)])
        return jnp.packbits(flat.astype(jnp.uint8))

    return FederatedAlgorithm(
        name=name, server_init=server_init, persistent_init=persistent_init,
        client_init=client_init, client_step=client_step, client_finish=client_finish,
        server_update=server_update, evaluate=evaluate, num_params=num_params,
        uplink_payload=uplink_payload,
    )


def downlink_bits_per_param(config: FedPMConfig, broadcast_theta_flat: np.ndarray) -> float:
    """Bits per entry of one broadcast: 32 for float scores, B for B-bit theta, or the ideal
    size of the server-sampled mask."""
    if config.downlink == "quantized":
        return float(config.downlink_bits)
    if config.downlink == "sampled_mask":
        n = broadcast_theta_flat.size
        return float(masking.mask_bits(jnp.float32((broadcast_theta_flat > 0.5).sum()), n)) / n
    return 32.0


def flat(tree: PyTree) -> np.ndarray:
    """All leaves of a parameter tree as one flat host array, in the uplink payload's order."""
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def unflat(vector: np.ndarray, like: PyTree) -> PyTree:
    """Inverse of ``flat`` for a tree shaped like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(jnp.asarray(vector[start:start + leaf.size].reshape(leaf.shape), leaf.dtype))
        start += leaf.size
    return jax.tree.unflatten(treedef, out)


def theta(server: FedPMServerState) -> PyTree:
    """The global keep-probabilities sigmoid(scores)."""
    return jax.tree.map(jax.nn.sigmoid, server.scores)
