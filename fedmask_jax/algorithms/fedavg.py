"""FedAvg over dense weights, with a compressed uplink: the family of FedPM's baselines.

Clients train the dense model's weights from the broadcast global weights (local epochs of
SGD or Adam), then send their model update Delta = w_local - w_global through a
``Compressor`` (identity for plain FedAvg, signs, top-k, QSGD, TernGrad, DRIVE, with or
without error feedback). The server averages what it decodes -- or, for SignSGD, takes the
majority vote sign(sum of signs) -- and hands the negated aggregate as a pseudo-gradient to
an optax server optimizer (SGD with learning rate 1 is plain FedAvg; Reddi et al. 2021 for
the adaptive ones). How the decoded updates are combined is an ``Aggregation``
(``aggregations.py``); DP-FedAvg is FedAvg with its mean wrapped in clipping and noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedmask_jax import models, privacy
from fedmask_jax.algorithms import aggregations as A
from fedmask_jax.algorithms import compressors as C
from fedmask_jax.algorithms.aggregations import Aggregation
from fedmask_jax.algorithms.base import (Batch, ClientResult, FederatedAlgorithm, MethodSpec, PyTree,
                                         client_lr_setting, gradient_step)
from fedmask_jax.algorithms.compressors import Compressor
from fedmask_jax.config import check, setting
from fedmask_jax.models import count_entries

OPTIMIZERS = ("sgd", "sgdm", "adam")
AGGREGATIONS = tuple(A.PLAIN)


def _power_of_two(value: int) -> str | None:
    return None if value >= 2 and value & (value - 1) == 0 else f"must be a power of 2 >= 2, got {value}"


# Settings a method's config re-declares with its own default (signSGD): one declaration each,
# a fresh field per class.
def server_lr_setting(default: float):
    return setting(default, "Server learning rate.", min=0, min_open=True, vary=True)


def aggregation_setting(default: str):
    # mean | majority_vote (sign of the sum of the decoded messages); set by the method.
    return setting(default, "Aggregation of the decoded messages.", choices=AGGREGATIONS, flag=False)


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """The dense methods: client and server optimizers (the server's acts on -(aggregate))."""

    client_optimizer: str = setting("sgd", "Client optimizer of the dense weights.", choices=OPTIMIZERS)
    client_lr: float = client_lr_setting()
    client_momentum: float = setting(0.9, "Momentum for --client_optimizer=sgdm.", min=0, max=1,
                                     max_open=True, vary=True)
    server_optimizer: str = setting("sgd", "Optax optimizer the server applies to -(aggregated "
                                    "update); sgd at lr 1 is FedAvg.", choices=OPTIMIZERS)
    server_lr: float = server_lr_setting(1.0)
    server_momentum: float = setting(0.9, "Momentum for --server_optimizer=sgdm.", min=0, max=1,
                                     max_open=True, vary=True)
    aggregation: str = aggregation_setting("mean")

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class FedAvgConfig(DenseConfig):
    """FedAvg, and DP-FedAvg (McMahan et al. 2018) when its update clipping and noise are set."""

    dp_clip: float = setting(0.0, "DP-FedAvg: clip each client's model update to this L2 norm "
                             "(the initial norm with --dp_clip_quantile; 0 = no clipping).", min=0)
    dp_noise_multiplier: float = setting(
        0.0, "DP-FedAvg: Gaussian noise on the sum of the clipped updates, its std this times the "
        "clip norm (0 = no noise). The privacy accountant reads this value.", min=0)
    dp_clip_quantile: float = setting(
        0.0, "Adaptive clipping (Andrew et al. 2021): move the clip norm towards this quantile of "
        "the clients' update norms each round (0 = a fixed --dp_clip).", min=0, max=1, max_open=True)
    dp_clip_lr: float = setting(0.2, "Adaptive clipping: geometric step of the clip norm.",
                                min=0, min_open=True)
    dp_count_stddev: float = setting(
        0.5, "Adaptive clipping with noise: std of the noise on the count of unclipped clients "
        "(Andrew et al. use clients_per_round / 20); it must exceed half --dp_noise_multiplier.",
        min=0, min_open=True)
    dp_delta: float = privacy.dp_delta_setting()
    target_epsilon: float = privacy.target_epsilon_setting()

    def __post_init__(self):
        check(self)
        if self.dp_noise_multiplier > 0 and self.dp_clip == 0:
            raise ValueError("--dp_noise_multiplier needs --dp_clip > 0: the noise is scaled to the clip norm")
        if self.dp_clip_quantile > 0 and self.dp_clip == 0:
            raise ValueError("--dp_clip_quantile needs --dp_clip > 0: the clip norm it starts from")
        if self.target_epsilon > 0 and self.dp_noise_multiplier == 0:
            raise ValueError("--target_epsilon needs --dp_noise_multiplier > 0: without noise there is "
                             "no finite epsilon")
        if self.dp_noise_multiplier > 0 and self.dp_clip_quantile > 0 \
                and not 2 * self.dp_count_stddev > self.dp_noise_multiplier:
            raise ValueError(f"--dp_count_stddev={self.dp_count_stddev:g} must exceed half of "
                             f"--dp_noise_multiplier={self.dp_noise_multiplier:g}: the noise on the "
                             "clipped count spends part of the privacy budget (Andrew et al. 2021)")

    @property
    def update_noise_multiplier(self) -> float:
        """The update sum's noise multiplier: all of ``dp_noise_multiplier`` with a fixed clip;
        with adaptive clipping, what is left after the count's noise (Andrew et al. 2021, Thm 1:
        z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2))."""
        z = self.dp_noise_multiplier
        if z == 0 or self.dp_clip_quantile == 0:
            return z
        return (z ** -2 - (2 * self.dp_count_stddev) ** -2) ** -0.5


@dataclasses.dataclass(frozen=True)
class SignSGDConfig(DenseConfig):
    # A majority vote moves every weight by the full server step, so it needs a small one;
    # tuned on Fashion-MNIST (experiments/configs/methods/signsgd.flags).
    server_lr: float = server_lr_setting(3e-3)
    aggregation: str = aggregation_setting("majority_vote")


@dataclasses.dataclass(frozen=True)
class TopKConfig(DenseConfig):
    topk_fraction: float = setting(0.01, "topk: fraction of the update's entries sent.",
                                   min=0, max=1, min_open=True)


@dataclasses.dataclass(frozen=True)
class QSGDConfig(DenseConfig):
    qsgd_levels: int = setting(8, "qsgd: quantisation levels s.", min=1)
    qsgd_bucket: int = setting(512, "qsgd: entries per bucket (one norm each).", min=1)


@dataclasses.dataclass(frozen=True)
class DriveConfig(DenseConfig):
    drive_chunk: int = setting(4096, "drive: Hadamard rotation size (one scale per chunk).",
                               check=_power_of_two)


@dataclasses.dataclass(frozen=True)
class EdenConfig(DenseConfig):
    eden_bits: int = setting(2, "eden: bits per rotated entry (Lloyd-Max levels 2^bits; 1 bit is "
                             "DRIVE).", min=1, max=8)
    eden_chunk: int = setting(4096, "eden: Hadamard rotation size (one scale per chunk).",
                              check=_power_of_two)


def make_optimizer(kind: str, lr: float, momentum: float) -> optax.GradientTransformation:
    if kind == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=momentum if kind == "sgdm" else None)


class FedAvgHyper(NamedTuple):
    """The hyperparameters the round reads as values (``vary=True`` settings), so that runs
    differing in them can share one program."""

    client_lr: jax.Array
    client_momentum: jax.Array
    server_lr: jax.Array
    server_momentum: jax.Array


class FedAvgServerState(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    round: jax.Array
    key: jax.Array
    hp: FedAvgHyper
    aggregation: Any  # the aggregation's state (DP-FedAvg: the clip norm)


class FedAvgClientState(NamedTuple):
    params: PyTree
    opt_state: optax.OptState


def init_dense_params(model: nn.Module, sample_x: jax.Array, key: jax.Array) -> PyTree:
    return models.init_dense_variables(model, sample_x, key)["params"]


def compressed_fedavg(model: nn.Module, sample_x: jax.Array, config: DenseConfig,
                      compressor: Compressor, aggregation: Aggregation | None = None,
                      name: str = "fedavg") -> FederatedAlgorithm:
    """Builds the method for a dense Flax ``model`` with ``compressor`` on the uplink and
    ``aggregation`` combining the decoded updates (by default the plain one
    ``config.aggregation`` names)."""
    if aggregation is None:
        aggregation = plain_aggregation(config)

    def client_opt(hp: FedAvgHyper):
        return make_optimizer(config.client_optimizer, hp.client_lr, hp.client_momentum)

    def server_opt(hp: FedAvgHyper):
        return make_optimizer(config.server_optimizer, hp.server_lr, hp.server_momentum)

    def initial_hp():  # fresh arrays for each server state: a round donates its input state
        return FedAvgHyper(*(jnp.float32(v) for v in (config.client_lr, config.client_momentum,
                                                      config.server_lr, config.server_momentum)))

    shapes = jax.eval_shape(lambda k: init_dense_params(model, sample_x, k), jax.random.key(0))
    num_params = count_entries(shapes)
    unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))[1]

    def server_init(key):
        params = init_dense_params(model, sample_x, key)
        hp = initial_hp()
        return FedAvgServerState(params, server_opt(hp).init(params), jnp.zeros((), jnp.int32),
                                 jax.random.fold_in(key, 1), hp, aggregation.init())

    def persistent_init():
        return compressor.init(num_params)

    def client_init(server, persistent):
        return FedAvgClientState(server.params, client_opt(server.hp).init(server.params))

    def loss_fn(params, batch: Batch):
        logits = model.apply({"params": params}, batch.x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        return jnp.sum(ce * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)

    def client_params(state: FedAvgClientState):
        return state.params

    def client_loss(server, state: FedAvgClientState, params, batch: Batch, key):
        loss = loss_fn(params, batch)
        return loss, loss

    def client_apply(server, state: FedAvgClientState, grads):
        updates, opt_state = client_opt(server.hp).update(grads, state.opt_state, state.params)
        return FedAvgClientState(optax.apply_updates(state.params, updates), opt_state)

    def client_finish(server, state: FedAvgClientState, persistent, num_examples, key):
        delta = ravel_pytree(state.params)[0] - ravel_pytree(server.params)[0]
        norm = jnp.linalg.norm(delta)
        delta, side, metrics = aggregation.client(delta, norm, server.aggregation)
        metrics = {"update_norm": norm, **metrics}
        message, persistent = compressor.encode(delta, persistent, key)
        # The server's reconstruction, from the message and the shared key only.
        decoded = compressor.decode(message, key)
        metrics.update(uplink_bpp=compressor.bits(message) / num_params)
        return ClientResult((decoded, side), persistent, metrics)

    def server_update(server: FedAvgServerState, contribution_sum, num_clients):
        decoded_sum, side_sum = contribution_sum
        chex.assert_shape(decoded_sum, (num_params,))
        round_key = jax.random.fold_in(server.key, server.round)
        aggregate, aggregation_state = aggregation.server(decoded_sum, side_sum, server.aggregation,
                                                          round_key, num_clients)
        pseudo_grad = unravel(-aggregate)
        updates, opt_state = server_opt(server.hp).update(pseudo_grad, server.opt_state, server.params)
        return server._replace(params=optax.apply_updates(server.params, updates),
                               opt_state=opt_state, round=server.round + 1,
                               aggregation=aggregation_state)

    def evaluate(server: FedAvgServerState, batch: Batch, key):
        logits = model.apply({"params": server.params}, batch.x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        return {
            "test_loss": jnp.sum(ce * batch.mask),
            "test_accuracy": jnp.sum((jnp.argmax(logits, -1) == batch.y) * batch.mask),
        }

    return FederatedAlgorithm(
        name=name, server_init=server_init, persistent_init=persistent_init,
        client_init=client_init, client_step=gradient_step(client_params, client_loss, client_apply),
        client_finish=client_finish, server_update=server_update, evaluate=evaluate,
        num_params=num_params, downlink_bits=lambda server: jnp.float32(32 * num_params),  # float32 weights
        client_params=client_params, client_loss=client_loss, client_apply=client_apply,
    )


def layer_sizes(model: nn.Module, sample_x: jax.Array) -> list[int]:
    """Sizes of the parameter leaves in flat-vector order (for per-layer scales)."""
    shapes = jax.eval_shape(lambda k: init_dense_params(model, sample_x, k), jax.random.key(0))
    return [int(s.size) for s in jax.tree.leaves(shapes)]


def plain_aggregation(config: DenseConfig) -> Aggregation:
    return A.PLAIN[config.aggregation]()


def fedavg_aggregation(config: FedAvgConfig) -> Aggregation:
    """The mean, wrapped in DP-FedAvg's clipping and noise when ``dp_clip`` is set: each
    update clipped to the clip norm, Gaussian noise on their sum (``dp_noise_multiplier`` x
    clip, less the count's share with adaptive clipping), the clip norm adapted to a quantile
    of the update norms with ``dp_clip_quantile``."""
    inner = plain_aggregation(config)
    if config.dp_clip == 0:
        return inner
    return A.differentially_private(inner, config.dp_clip, config.update_noise_multiplier,
                                    count_noise=config.dp_noise_multiplier > 0,
                                    clip_quantile=config.dp_clip_quantile, clip_lr=config.dp_clip_lr,
                                    count_stddev=config.dp_count_stddev)


def _dense(compressor_for: Callable[[DenseConfig, int, list[int]], Compressor],
           aggregation_for: Callable[[DenseConfig], Aggregation], name: str):
    """Builder of a dense method: FedAvg with ``compressor_for(config, n, layer sizes)`` on
    the uplink and ``aggregation_for(config)`` on the server."""

    def build(arch: models.Architecture, config: DenseConfig) -> FederatedAlgorithm:
        model, sample_x = arch.build(masked=False), arch.sample_input()
        segments = layer_sizes(model, sample_x)
        return compressed_fedavg(model, sample_x, config, compressor_for(config, sum(segments), segments),
                                 aggregation_for(config), name=name)

    return build


def _spec(name: str, description: str, config: type, compressor_for,
          aggregation_for=plain_aggregation) -> MethodSpec:
    return MethodSpec(name, description, config, _dense(compressor_for, aggregation_for, name),
                      masked=False, host_hooks=privacy.accountant_hooks)


SPECS = (
    _spec("fedavg", "FedAvg: the model update as 32-bit floats", FedAvgConfig,
          lambda c, n, seg: C.identity(), fedavg_aggregation),
    _spec("signsgd", "SignSGD, majority vote: sign of the update (1 bit per parameter)", SignSGDConfig,
          lambda c, n, seg: C.sign()),
    _spec("ef_signsgd", "EF-SignSGD: per-layer scaled signs with error feedback", DenseConfig,
          lambda c, n, seg: C.error_feedback(C.scaled_sign(seg))),
    _spec("topk", "Top-k with error feedback: k values and their positions", TopKConfig,
          lambda c, n, seg: C.error_feedback(C.top_k(c.topk_fraction, n))),
    _spec("qsgd", "QSGD: s-level stochastic quantisation per bucket, Elias-coded", QSGDConfig,
          lambda c, n, seg: C.qsgd(c.qsgd_levels, c.qsgd_bucket, n)),
    _spec("terngrad", "TernGrad: per-layer scaled ternary update (2 bits per parameter)", DenseConfig,
          lambda c, n, seg: C.terngrad(seg)),
    _spec("drive", "DRIVE: signs after a random Hadamard rotation, one scale per chunk", DriveConfig,
          lambda c, n, seg: C.drive(c.drive_chunk, n)),
    _spec("eden", "EDEN: Lloyd-Max levels of a random Hadamard rotation, one unbiasing scale per chunk",
          EdenConfig, lambda c, n, seg: C.eden(c.eden_bits, c.eden_chunk, n)),
)
