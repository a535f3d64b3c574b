"""FedPM: federated probabilistic masks with Bayesian (Beta) aggregation (Isik et al., 2023).

Clients train real scores s over frozen random weights with Adam; each uploads one binary
mask m ~ Bernoulli(sigmoid(s)). The server smooths the masks (0 -> eps, 1 -> 1 - eps), adds
them to a Beta(alpha, beta) posterior per entry and broadcasts the mode's logit. Defaults
follow the authors' code (docs/design.md, "The method").
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedmask_jax import coding, masking, models, privacy
from fedmask_jax.algorithms import fedpm_host
from fedmask_jax.algorithms.base import (Batch, ClientResult, FederatedAlgorithm, MethodSpec, PyTree,
                                         client_lr_setting, gradient_step)
from fedmask_jax.algorithms.shows import CodedUplink, Column, SecondAccuracy, Shows
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

    client_lr: float = client_lr_setting()
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
    mask_entropy_reg: float = setting(
        0.0, "Add this times the mean binary entropy of the keep-probabilities sigmoid(s) to the "
        "local loss (Mestoukirdi et al. 2023): pushes them to 0 or 1, lowering the masks' coded "
        "size (0 = off).", min=0)
    mask_rr_epsilon: float = setting(
        0.0, "Local DP: flip each uplink mask entry with probability 1/(1+e^eps) (randomized "
        "response, eps per entry); the server debiases the counts (0 = off).", min=0)
    dp_delta: float = privacy.dp_delta_setting()
    target_epsilon: float = privacy.target_epsilon_setting()
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




@dataclasses.dataclass(frozen=True)
class KLMSConfig(FedPMConfig):
    """FedPM whose uplink is KL-minimizing side-information coding (Isik, Pase et al., AISTATS
    2024; the authors' FedPM-KLMS): per block of mask entries, candidates drawn from the
    broadcast Bernoulli(theta_g) with randomness the server shares, one chosen by importance
    weight q/p (q: the client's trained keep-probabilities), its index sent."""

    klms_adaptive: bool = setting(True, "klms: blocks grow until their KL(q||p) would pass "
                                  "--klms_kl_rate bits (at most 256 entries; each block's size sent "
                                  "in 8 bits); else fixed blocks of --klms_block_size.")
    klms_kl_rate: int = setting(2, "klms, adaptive: bits per block (2^this candidates).", min=1, max=16)
    klms_block_size: int = setting(8, "klms, fixed blocks: entries per block.", min=1)
    klms_samples_log2: int = setting(1, "klms, fixed blocks: bits per block (2^this candidates).",
                                     min=1, max=16)
    coded_uplink: bool = setting(False, "Range-code uplink masks for real (constriction) on the host, "
                                 "off the critical path, to verify the exact code lengths the round "
                                 "computes on the device.")

    def __post_init__(self):
        super().__post_init__()
        if self.coded_uplink:
            raise ValueError("--coded_uplink does not apply to klms: its uplink is block indices, "
                             "not a range-coded mask")
        if self.mask_rr_epsilon > 0:
            raise ValueError("--mask_rr_epsilon does not apply to klms: its message is a sample index")


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
    """Builds FedPM for a masked Flax ``model``; ``sample_x`` is one input batch for shapes.
    A ``KLMSConfig`` makes it FedPM-KLMS: the same training and server, the uplink coded by
    ``klms_encode``."""
    klms = config if isinstance(config, KLMSConfig) else None
    def optimizer(hp: FedPMHyper | None = None):  # the learning rate only scales updates
        return optax.adam(config.client_lr if hp is None else hp.client_lr)

    thresholded = model.clone(mask_mode="threshold")
    flip = privacy.flip_probability(config.mask_rr_epsilon) if config.mask_rr_epsilon > 0 else 0.0

    def init_variables(key):
        return models.init_model_variables(model, sample_x, key)

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
        ce = jnp.sum(ce * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)
        if config.mask_entropy_reg > 0:
            return ce + config.mask_entropy_reg * mean_mask_entropy(scores), ce
        return ce, ce

    def client_params(state: FedPMClientState):
        return state.scores

    def client_loss(server, state: FedPMClientState, scores, batch: Batch, key):
        return loss_fn(scores, server.frozen, batch, key)

    def client_apply(server, state: FedPMClientState, grads):
        updates, opt_state = optimizer(server.hp).update(grads, state.opt_state, state.scores)
        return FedPMClientState(optax.apply_updates(state.scores, updates), opt_state)

    def client_finish(server, state: FedPMClientState, persistent, num_examples, key):
        if klms is not None:
            return klms_finish(server, state, persistent, key)
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

    def klms_finish(server, state: FedPMClientState, persistent, key):
        q = _flat_probabilities(state.scores)
        p = _flat_probabilities(server.scores)
        message = klms_encode(q, p, key, klms)
        mask = klms_decode(message, p, key, klms)  # what the server reconstructs from the index
        ones = jnp.sum(mask)
        metrics = {
            "uplink_bpp": klms_bits(message, klms) / num_params,
            "klms_kl_bpp": jnp.sum(kl_bits(q, p)) / num_params,  # the realised KL(q || p)
            "klms_blocks": message.blocks.astype(jnp.float32),
            "mask_density": ones / num_params,
            "downlink_bpp": downlink_bits(server.scores) / num_params,
        }
        kept = state.opt_state if config.persistent_client_optimizer else persistent
        return ClientResult(models.unflat_like(mask, server.scores), kept, metrics)

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
        client_init=client_init, client_step=gradient_step(client_params, client_loss, client_apply),
        client_finish=client_finish, server_update=server_update, evaluate=evaluate,
        num_params=num_params, uplink_payload=uplink_payload, client_params=client_params,
        client_loss=client_loss, client_apply=client_apply,
    )


RR_STREAM = 0x22  # randomized response's flips: fold_in(a mask leaf's sampling key, this)
KLMS_SHARED, KLMS_PRIVATE = 0x4B1, 0x4B2  # klms: fold_in(client finish key, this)
KLMS_MAX_BLOCK = 256  # adaptive blocks' largest size: each block's size costs 8 bits
_P_CLIP = 1e-6


def mean_mask_entropy(scores: PyTree) -> jax.Array:
    """Mean binary entropy (nats) of the keep-probabilities sigmoid(s) over every entry:
    H = sigmoid(s) softplus(-s) + sigmoid(-s) softplus(s), stable for any s. Its gradient
    in s is -s sigmoid(s) (1 - sigmoid(s)) per entry, over the number of entries."""
    leaves = jax.tree.leaves(scores)
    total = sum(jnp.sum(jax.nn.sigmoid(s) * jax.nn.softplus(-s) + jax.nn.sigmoid(-s) * jax.nn.softplus(s))
                for s in leaves)
    return total / sum(s.size for s in leaves)


def _flat_probabilities(scores: PyTree) -> jax.Array:
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


def klms_blocks(q: jax.Array, p: jax.Array, cfg: KLMSConfig) -> jax.Array:
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


def _klms_samples(cfg: KLMSConfig) -> int:
    return 2 ** (cfg.klms_kl_rate if cfg.klms_adaptive else cfg.klms_samples_log2)


def _candidate(shared: jax.Array, j, p: jax.Array) -> jax.Array:
    """Candidate ``j`` for every block at once: entry i is 1 with probability p_i, drawn from
    randomness both ends derive from (round, client) -- one uniform per (candidate, entry)."""
    return (jax.random.uniform(jax.random.fold_in(shared, j), p.shape) < p).astype(jnp.float32)


def klms_encode(q: jax.Array, p: jax.Array, key: jax.Array, cfg: KLMSConfig) -> KLMSMessage:
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


def klms_decode(message: KLMSMessage, p: jax.Array, key: jax.Array, cfg: KLMSConfig) -> jax.Array:
    """The server's mask: in each block, the candidate its index names, regenerated from the
    shared randomness and the broadcast p."""
    shared = jax.random.fold_in(key, KLMS_SHARED)
    chosen = message.indices[message.block_of]

    def body(j, mask):
        return jnp.where(chosen == j, _candidate(shared, j, p), mask)

    return jax.lax.fori_loop(0, _klms_samples(cfg), body, jnp.zeros_like(p))


def klms_bits(message: KLMSMessage, cfg: KLMSConfig) -> jax.Array:
    """Bits of the message: each block's index (log2 of the candidates), plus, when the
    blocks are adaptive, each block's size (log2 256 = 8 bits; the authors' count)."""
    per_block = (cfg.klms_kl_rate + math.log2(KLMS_MAX_BLOCK)) if cfg.klms_adaptive else cfg.klms_samples_log2
    return message.blocks.astype(jnp.float32) * per_block


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


def theta(server: FedPMServerState) -> PyTree:
    """The global keep-probabilities sigmoid(scores)."""
    return masking.keep_probabilities(server.scores)


def _masked_model(arch: models.Architecture, config: FedPMConfig) -> nn.Module:
    return arch.build(masked=True, weight_init=config.weight_init, mask_gradient=config.mask_gradient)


def _host_hooks(ctx):
    return [*fedpm_host.hooks(ctx), *privacy.accountant_hooks(ctx)]


# What a mask method's runs show: the thresholded model's accuracy beside the sampled one's,
# the masks coded with theta_g as the prior (checked by the host's range coder), the density.
SHOWS = Shows(
    columns=(Column("uplink_bpp_coded_prior", "coded", "{uplink_bpp_coded_global:.3f}/{:.3f}"),
             Column("verified_clients", "checked"),
             Column("mask_density", "density", "{:.3f}")),
    accuracy_also=SecondAccuracy("test_accuracy_thresholded", console="thr", summary="thresholded",
                                 curve="θ>0.5", first_curve="sampled mask"),
    coded_uplink=CodedUplink("cumulative_uplink_bits_coded_prior", "mean_uplink_bpp_coded_prior",
                             header="coded uplink bpp (θ_g prior)", curve="θ_g-coded",
                             also=("mean_uplink_bpp_coded_global",)),
    summary=(("final_model_bpp", ", final model {:.4f} bpp"),
             ("final_model_file_bpp", " (file {:.4f} bpp)"),
             ("mean_uplink_bpp_coded_prior",
              ", coded uplink {mean_uplink_bpp_coded_global:.4f} bpp global / {:.4f} bpp with theta_g"),
             ("mean_uplink_bpp_measured_prior", " (range coder: {:.4f} on {verified_clients_total} masks)")),
    results=("final_model_file_bpp",),
)

SPECS = (
    MethodSpec("fedpm", "FedPM: one sampled binary mask (< 1 bit per parameter after entropy coding)",
               FedPMConfig, lambda arch, cfg: fedpm(_masked_model(arch, cfg), arch.sample_input(), cfg),
               masked=True, host_hooks=_host_hooks, shows=SHOWS),
    MethodSpec("fedmask", "FedMask-style: the deterministic mask 1[sigmoid(s) > 0.5]",
               FedPMConfig, lambda arch, cfg: fedmask(_masked_model(arch, cfg), arch.sample_input(), cfg),
               masked=True, host_hooks=_host_hooks, shows=SHOWS),
    MethodSpec("klms", "FedPM-KLMS: per block of mask entries, the index of one of 2^b candidates "
               "drawn from theta_g with shared randomness (importance-sampled by q/p)",
               KLMSConfig, lambda arch, cfg: fedpm(_masked_model(arch, cfg), arch.sample_input(), cfg,
                                                  name="klms"),
               masked=True, host_hooks=_host_hooks, shows=SHOWS),
)
