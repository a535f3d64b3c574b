"""FedPM: federated probabilistic masks with Bayesian (Beta) aggregation (Isik et al., 2023).

Clients train real scores s over frozen random weights with Adam; each uploads one binary
mask m ~ Bernoulli(sigmoid(s)). The server smooths the masks (0 -> eps, 1 -> 1 - eps), adds
them to a Beta(alpha, beta) posterior per entry and broadcasts the mode's logit. Defaults
follow the authors' code (docs/design.md, "The method").
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmask_jax import coding, masking, models, privacy
from fedmask_jax.algorithms.base import Batch, ClientResult, FederatedAlgorithm, MethodSpec, PyTree
from fedmask_jax.config import check, setting


DOWNLINKS = ("float32", "quantized", "sampled_mask")
EXPORT_MASKS = ("auto", "sampled", "thresholded", "none")


def _verify_count(value: str) -> str | None:
    if value == "all" or (value.isdigit() and int(value) >= 0):
        return None
    return f"must be a number of clients (0, 1, 2, ...) or 'all', got {value!r}"


@dataclasses.dataclass(frozen=True)
class FedPMConfig:
    """FedPM's (and FedMask's) settings; defaults follow the authors' code."""

    client_lr: float = setting(0.1, "Client learning rate (mask methods: Adam on the scores; dense "
                               "methods: --client_optimizer).",
                               min=0, min_open=True, vary=True)
    epsilon: float = setting(0.01, "Uplink mask smoothing 0 -> eps, 1 -> 1 - eps before aggregation.",
                             min=0, max=0.5, min_open=True, max_open=True, vary=True)
    lambda0: float = setting(1.0, "Server Beta prior alpha = beta = lambda0 (>= 1: the mode needs it).",
                             min=1.0, vary=True)
    prior_reset_period: int = setting(1, "Reset the server's Beta prior every this many rounds "
                                      "(1 = every round, the reference).", min=1, vary=True)
    persistent_client_optimizer: bool = setting(
        False, "Keep each client's Adam state across the rounds it joins (a reference quirk).")
    downlink: str = setting("float32", "Server broadcast: float32 scores (32 bpp), theta_g quantised "
                            "to --downlink_bits, or one sampled mask.", choices=DOWNLINKS)
    downlink_bits: int = setting(4, "Bits per entry for --downlink=quantized.", min=1, max=16)
    weight_init: str = setting("signed_constant", "Frozen weights: +-e*sqrt(1/fan_in) (reference) "
                               "or +-sqrt(2/fan_in).", choices=models.WEIGHT_INITS, vary=True)
    mask_gradient: str = setting("reference", "Surrogate gradient through the mask sample: "
                                 "theta*g (reference) or straight-through.", choices=masking.GRADIENTS)
    coded_uplink: bool = setting(
        True, "Range-code uplink masks for real (constriction) on the host, off the critical "
        "path, to verify the exact code lengths the round computes on the device.")
    verify_coded_clients: str = setting(
        "10", "With --coded_uplink: clients per round whose masks are range-coded, decoded and "
        "checked (a number, or 'all').", check=_verify_count)
    export_mask: str = setting("auto", "The final model file <workdir>/model.fmjx: one mask sampled "
                               "from theta_g, or 1[theta_g > 0.5], or none (auto: sampled for "
                               "fedpm, thresholded for fedmask).", choices=EXPORT_MASKS)
    mask_rr_epsilon: float = setting(
        0.0, "Local DP: flip each uplink mask entry with probability 1/(1+e^eps) (randomized "
        "response, eps per entry); the server debiases the counts (0 = off).", min=0)
    dp_delta: float = setting(1e-5, "The delta at which the accountant reports epsilon (must be "
                              "below 1 / --num_clients).", min=0, max=1, min_open=True, max_open=True)
    target_epsilon: float = setting(0.0, "Stop the run at the last round whose epsilon stays within "
                                    "this (0 = no target).", min=0)
    # FedMask-style: train and send the deterministic mask 1[s > 0] instead of a sample.
    deterministic: bool = setting(False, "Send 1[s > 0] instead of a sample.", flag=False)

    def __post_init__(self):
        check(self)
        if self.target_epsilon > 0 and self.mask_rr_epsilon == 0:
            raise ValueError("--target_epsilon needs --mask_rr_epsilon > 0 for a mask method: without "
                             "randomized response there is no finite epsilon")

    def verified_clients(self, cohort_size: int) -> int:
        """How many clients' masks are range-coded and checked each round."""
        if not self.coded_uplink:
            return 0
        if self.verify_coded_clients == "all":
            return cohort_size
        return min(int(self.verify_coded_clients), cohort_size)




class FedPMHyper(NamedTuple):
    """The hyperparameters the round reads as values, so that runs differing in them can
    share one program (``FedPMConfig`` fields with ``vary=True``)."""

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


class FedPMClientState(NamedTuple):
    scores: PyTree
    opt_state: optax.OptState


def init_model_variables(model: nn.Module, sample_x: jax.Array, key: jax.Array) -> dict:
    """Scores and frozen weights from one key -- how a saved model rebuilds its weights."""
    k_scores, k_frozen, k_mask = jax.random.split(key, 3)
    return model.init({"params": k_scores, "frozen": k_frozen, "mask": k_mask}, sample_x)


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
    def optimizer(hp: FedPMHyper | None = None):  # the learning rate only scales updates
        return optax.adam(config.client_lr if hp is None else hp.client_lr)

    thresholded = model.clone(mask_mode="threshold")
    flip = privacy.flip_probability(config.mask_rr_epsilon) if config.mask_rr_epsilon > 0 else 0.0

    def init_variables(key):
        return init_model_variables(model, sample_x, key)

    shapes = jax.eval_shape(init_variables, jax.random.key(0))
    num_params = models.count_entries(shapes["params"])

    def server_init(key):
        variables = init_variables(key)
        scores = variables["params"]
        full = lambda v: jax.tree.map(lambda s: jnp.full_like(s, v), scores)  # noqa: E731
        return FedPMServerState(
            frozen=variables["frozen"], scores=scores, alpha=full(config.lambda0),
            beta=full(config.lambda0), round=jnp.zeros((), jnp.int32),
            key=jax.random.fold_in(key, 1),
            hp=FedPMHyper(jnp.float32(config.client_lr), jnp.float32(config.epsilon),
                          jnp.float32(config.lambda0), jnp.int32(config.prior_reset_period)),
        )

    def persistent_init():
        if not config.persistent_client_optimizer:
            return ()
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
        return optimizer().init(zeros)

    def client_init(server, persistent):
        opt_state = persistent if config.persistent_client_optimizer else optimizer().init(server.scores)
        return FedPMClientState(server.scores, opt_state)

    def loss_fn(scores, frozen, batch: Batch, key):
        logits = model.apply({"params": scores, "frozen": frozen}, batch.x, rngs={"mask": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        return jnp.sum(ce * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)

    def client_step(server, state: FedPMClientState, batch: Batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state.scores, server.frozen, batch, key)
        updates, opt_state = optimizer(server.hp).update(grads, state.opt_state, state.scores)
        return FedPMClientState(optax.apply_updates(state.scores, updates), opt_state), loss

    def client_finish(server, state: FedPMClientState, persistent, num_examples, key):
        leaves, treedef = jax.tree.flatten(state.scores)
        keys = jax.random.split(key, len(leaves))
        if config.deterministic:
            masks = [masking.threshold_mask(s) for s in leaves]
        else:
            masks = [jax.random.bernoulli(k, jax.nn.sigmoid(s)).astype(jnp.float32)
                     for k, s in zip(keys, leaves)]
        if flip > 0:  # randomized response: what leaves the client is the flipped mask
            masks = [randomized_response(jax.random.fold_in(k, RR_STREAM), m, flip) for k, m in zip(keys, masks)]
        ones = sum(jnp.sum(m) for m in masks)
        broadcast = jax.tree.leaves(server.scores)
        metrics = {
            "uplink_bpp": masking.mask_bits(ones, num_params) / num_params,
            "mask_density": ones / num_params,
            # Exact code lengths of the two range codes (coding.py), per entry.
            "uplink_bpp_coded_prior": sum(
                coded_bits_prior(m, s) for m, s in zip(masks, broadcast)) / num_params,
            "uplink_bpp_coded_global": coded_bits_global(ones, num_params) / num_params,
            "downlink_bpp": downlink_bits(server.scores) / num_params,
        }
        kept = state.opt_state if config.persistent_client_optimizer else persistent
        return ClientResult(jax.tree.unflatten(treedef, masks), kept, metrics)

    def server_update(server: FedPMServerState, mask_counts, num_clients):
        chex.assert_trees_all_equal_shapes_and_dtypes(mask_counts, server.scores)
        k = num_clients.astype(jnp.float32)
        hp = server.hp
        if flip > 0:  # unbiased counts of the masks before their flips, within [0, K]
            mask_counts = jax.tree.map(lambda c: jnp.clip(debias_counts(c, k, flip), 0.0, k), mask_counts)
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

    def compress_broadcast(theta, key, epsilon):
        """What the clients receive in place of theta_g (the posterior stays exact)."""
        if config.downlink == "quantized":  # mid-points of 2**bits equal bins of [0, 1]
            levels = 2 ** config.downlink_bits
            return jax.tree.map(
                lambda t: (jnp.clip(jnp.floor(t * levels), 0, levels - 1) + 0.5) / levels, theta)
        if config.downlink == "sampled_mask":  # one binary mask, smoothed like an uplink mask
            leaves, treedef = jax.tree.flatten(theta)
            keys = jax.random.split(key, len(leaves))
            return jax.tree.unflatten(treedef, [
                masking.smooth_mask(jax.random.bernoulli(k, t).astype(jnp.float32), epsilon)
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

    def downlink_bits(scores):
        """Bits of the broadcast these scores came from: 32 per entry for float scores, B for
        B-bit theta_g, the ideal size of the server-sampled mask."""
        if config.downlink == "quantized":
            return jnp.float32(config.downlink_bits * num_params)
        if config.downlink == "sampled_mask":
            ones = sum(jnp.sum(jax.nn.sigmoid(s) > 0.5) for s in jax.tree.leaves(scores)).astype(jnp.float32)
            return masking.mask_bits(ones, num_params)
        return jnp.float32(32 * num_params)

    def uplink_payload(mask_tree):
        """The client's binary mask, flattened and bit-packed (1 bit per entry)."""
        flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(mask_tree)])
        chex.assert_shape(flat, (num_params,))
        return jnp.packbits(flat.astype(jnp.uint8))

    return FederatedAlgorithm(
        name=name, server_init=server_init, persistent_init=persistent_init,
        client_init=client_init, client_step=client_step, client_finish=client_finish,
        server_update=server_update, evaluate=evaluate, num_params=num_params,
        uplink_payload=uplink_payload,
    )


RR_STREAM = 0x22  # randomized response's flips: fold_in(a mask leaf's sampling key, this)


def randomized_response(key: jax.Array, mask: jax.Array, flip: float) -> jax.Array:
    """Each entry of a binary mask flipped independently with probability ``flip``."""
    return jnp.abs(mask - jax.random.bernoulli(key, flip, mask.shape).astype(mask.dtype))


def debias_counts(counts: jax.Array, k: jax.Array, flip: float) -> jax.Array:
    """Unbiased estimate of the number of ones among K masks from the count of ones among
    their randomized-response copies: E[count] = c (1 - 2 flip) + K flip."""
    return (counts - k * flip) / (1.0 - 2.0 * flip)


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


def _masked_model(arch: models.Architecture, config: FedPMConfig) -> nn.Module:
    return arch.build(masked=True, weight_init=config.weight_init, mask_gradient=config.mask_gradient)


def _host_hooks(ctx):
    from fedmask_jax.algorithms import fedpm_host  # host-only: range coding, model files

    return [*fedpm_host.hooks(ctx), *privacy.accountant_hooks(ctx)]


SPECS = (
    MethodSpec("fedpm", "FedPM: one sampled binary mask (< 1 bit per parameter after entropy coding)",
               FedPMConfig, lambda arch, cfg: fedpm(_masked_model(arch, cfg), arch.sample_input(), cfg),
               masked=True, host_hooks=_host_hooks),
    MethodSpec("fedmask", "FedMask-style: the deterministic mask 1[sigmoid(s) > 0.5]",
               FedPMConfig, lambda arch, cfg: fedmask(_masked_model(arch, cfg), arch.sample_input(), cfg),
               masked=True, host_hooks=_host_hooks),
)
