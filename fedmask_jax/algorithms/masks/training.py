"""Client training of a mask model: Adam on the real scores s over frozen random weights,
the forward pass drawing a mask from sigmoid(s) (or thresholding it, FedMask-style); and the
model's evaluation from the broadcast scores."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedmask_jax import masking, models
from fedmask_jax.algorithms.base import Batch, PyTree, client_lr_setting
from fedmask_jax.config import setting


@dataclasses.dataclass(frozen=True)
class MaskTrainingConfig:
    """How a client trains its scores (and how the masked model is built)."""

    client_lr: float = client_lr_setting()
    persistent_client_optimizer: bool = setting(
        False, "Keep each client's Adam state across the rounds it joins (a reference quirk).")
    weight_init: str = setting("signed_constant", "Frozen weights: +-e*sqrt(1/fan_in) (reference) "
                               "or +-sqrt(2/fan_in).", choices=models.WEIGHT_INITS, vary=True)
    mask_gradient: str = setting("reference", "Surrogate gradient through the mask sample: "
                                 "theta*g (reference) or straight-through.", choices=masking.GRADIENTS)
    mask_entropy_reg: float = setting(
        0.0, "Add this times the mean binary entropy of the keep-probabilities sigmoid(s) to the "
        "local loss (Mestoukirdi et al. 2023): pushes them to 0 or 1, lowering the masks' coded "
        "size (0 = off).", min=0)
    # FedMask-style: train through (and evaluate) the deterministic mask 1[s > 0] instead of a
    # sample. Set by the fedmask builder, not a flag; the run's record keeps it.
    deterministic: bool = setting(False, "Send 1[s > 0] instead of a sample.", flag=False)


class FedPMClientState(NamedTuple):
    scores: PyTree
    opt_state: optax.OptState


def mean_mask_entropy(scores: PyTree) -> jax.Array:
    """Mean binary entropy (nats) of the keep-probabilities sigmoid(s) over every entry:
    H = sigmoid(s) softplus(-s) + sigmoid(-s) softplus(s), stable for any s. Its gradient
    in s is -s sigmoid(s) (1 - sigmoid(s)) per entry, over the number of entries."""
    leaves = jax.tree.leaves(scores)
    total = sum(jnp.sum(jax.nn.sigmoid(s) * jax.nn.softplus(-s) + jax.nn.sigmoid(-s) * jax.nn.softplus(s))
                for s in leaves)
    return total / sum(s.size for s in leaves)


class MaskTraining(NamedTuple):
    """The client's half of a mask method and the model's evaluation. The server state it
    reads has ``scores`` (the broadcast), ``frozen`` and ``hp.client_lr``."""

    num_params: int
    init_variables: Callable[[jax.Array], dict]  # key -> {"params": scores, "frozen": weights}
    persistent_init: Callable[[], PyTree]
    client_init: Callable[[PyTree, PyTree], FedPMClientState]
    client_params: Callable[[FedPMClientState], PyTree]
    client_loss: Callable
    client_apply: Callable
    kept: Callable[[FedPMClientState, PyTree], PyTree]  # (state, persistent) -> what persists
    evaluate: Callable[[PyTree, Batch, jax.Array], dict]


def mask_training(model: nn.Module, sample_x: jax.Array, config: MaskTrainingConfig) -> MaskTraining:
    """Training and evaluation of a masked Flax ``model``; ``sample_x`` is one input batch
    for shapes."""
    if config.deterministic:
        model = model.clone(mask_mode="threshold_ste")
    thresholded = model.clone(mask_mode="threshold")

    def optimizer(hp=None):  # the learning rate only scales updates
        return optax.adam(config.client_lr if hp is None else hp.client_lr)

    def init_variables(key):
        return models.init_model_variables(model, sample_x, key)

    shapes = jax.eval_shape(init_variables, jax.random.key(0))

    def persistent_init():
        if not config.persistent_client_optimizer:
            return ()
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
        return optimizer().init(zeros)

    def client_init(server, persistent):
        opt_state = persistent if config.persistent_client_optimizer else optimizer().init(server.scores)
        return FedPMClientState(server.scores, opt_state)

    def client_params(state: FedPMClientState):
        return state.scores

    def client_loss(server, state: FedPMClientState, scores, batch: Batch, key):
        logits = model.apply({"params": scores, "frozen": server.frozen}, batch.x, rngs={"mask": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        ce = jnp.sum(ce * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)
        if config.mask_entropy_reg > 0:
            return ce + config.mask_entropy_reg * mean_mask_entropy(scores), ce
        return ce, ce

    def client_apply(server, state: FedPMClientState, grads):
        updates, opt_state = optimizer(server.hp).update(grads, state.opt_state, state.scores)
        return FedPMClientState(optax.apply_updates(state.scores, updates), opt_state)

    def kept(state: FedPMClientState, persistent):
        return state.opt_state if config.persistent_client_optimizer else persistent

    def evaluate(server, batch: Batch, key):
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

    return MaskTraining(models.count_entries(shapes["params"]), init_variables, persistent_init,
                        client_init, client_params, client_loss, client_apply, kept, evaluate)
