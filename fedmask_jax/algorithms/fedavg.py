"""FedAvg over dense weights, with a compressed uplink: the family of FedPM's baselines.

Clients train the dense model's weights from the broadcast global weights (local epochs of
SGD or Adam), then send their model update Delta = w_local - w_global through a
``Compressor`` (identity for plain FedAvg, signs, top-k, QSGD, TernGrad, DRIVE, with or
without error feedback). The server averages what it decodes -- or, for SignSGD, takes the
majority vote sign(sum of signs) -- and hands the negated aggregate as a pseudo-gradient to
an optax server optimizer (SGD with learning rate 1 is plain FedAvg; Reddi et al. 2021 for
the adaptive ones).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedmask_jax.algorithms.base import Batch, ClientResult, FederatedAlgorithm, PyTree
from fedmask_jax.algorithms.compressors import Compressor
from fedmask_jax.models import count_entries

OPTIMIZERS = ("sgd", "sgdm", "adam")
AGGREGATIONS = ("mean", "majority_vote")


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
    client_optimizer: str = "sgd"
    client_lr: float = 0.1
    client_momentum: float = 0.9  # for "sgdm"
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.9  # for "sgdm"
    aggregation: str = "mean"  # mean | majority_vote (sign of the sum of the decoded messages)

    def __post_init__(self):
        for flag, value in (("client_optimizer", self.client_optimizer),
                            ("server_optimizer", self.server_optimizer)):
            if value not in OPTIMIZERS:
                raise ValueError(f"--{flag}={value!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} is unknown; allowed: {AGGREGATIONS}")
        for flag, value in (("client_lr", self.client_lr), ("server_lr", self.server_lr)):
            if value <= 0:
                raise ValueError(f"--{flag} must be > 0, got {value}")
        for flag, value in (("client_momentum", self.client_momentum),
                            ("server_momentum", self.server_momentum)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"--{flag} must be in [0, 1), got {value}")


def make_optimizer(kind: str, lr: float, momentum: float) -> optax.GradientTransformation:
    if kind == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=momentum if kind == "sgdm" else None)


class FedAvgServerState(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    round: jax.Array
    key: jax.Array


class FedAvgClientState(NamedTuple):
    params: PyTree
    opt_state: optax.OptState


def init_dense_params(model: nn.Module, sample_x: jax.Array, key: jax.Array) -> PyTree:
    return model.init(key, sample_x)["params"]


def compressed_fedavg(model: nn.Module, sample_x: jax.Array, config: FedAvgConfig,
                      compressor: Compressor, name: str = "fedavg") -> FederatedAlgorithm:
    """Builds the method for a dense Flax ``model`` with ``compressor`` on the uplink."""
    client_opt = make_optimizer(config.client_optimizer, config.client_lr, config.client_momentum)
    server_opt = make_optimizer(config.server_optimizer, config.server_lr, config.server_momentum)
    shapes = jax.eval_shape(lambda k: init_dense_params(model, sample_x, k), jax.random.key(0))
    num_params = count_entries(shapes)
    unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))[1]

    def server_init(key):
        params = init_dense_params(model, sample_x, key)
        return FedAvgServerState(params, server_opt.init(params), jnp.zeros((), jnp.int32),
                                 jax.random.fold_in(key, 1))

    def persistent_init():
        return compressor.init(num_params)

    def client_init(server, persistent):
        return FedAvgClientState(server.params, client_opt.init(server.params))

    def loss_fn(params, batch: Batch):
        logits = model.apply({"params": params}, batch.x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        return jnp.sum(ce * batch.mask) / jnp.maximum(jnp.sum(batch.mask), 1.0)

    def client_step(server, state: FedAvgClientState, batch: Batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = client_opt.update(grads, state.opt_state, state.params)
        return FedAvgClientState(optax.apply_updates(state.params, updates), opt_state), loss

    def client_finish(server, state: FedAvgClientState, persistent, num_examples, key):
        delta = ravel_pytree(state.params)[0] - ravel_pytree(server.params)[0]
        message, persistent = compressor.encode(delta, persistent, key)
        # The server's reconstruction, from the message and the shared key only.
        decoded = compressor.decode(message, key)
        metrics = {"uplink_bits": compressor.bits(message),
                   "update_norm": jnp.linalg.norm(delta)}
        return ClientResult(decoded, persistent, metrics)

    def server_update(server: FedAvgServerState, decoded_sum, num_clients):
        if config.aggregation == "majority_vote":
            aggregate = jnp.sign(decoded_sum)
        else:
            aggregate = decoded_sum / num_clients
        pseudo_grad = unravel(-aggregate)
        updates, opt_state = server_opt.update(pseudo_grad, server.opt_state, server.params)
        return server._replace(params=optax.apply_updates(server.params, updates),
                               opt_state=opt_state, round=server.round + 1)

    def evaluate(server: FedAvgServerState, batch: Batch, key):
        logits = model.apply({"params": server.params}, batch.x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
        return {
            "test_loss": jnp.sum(ce * batch.mask),
            "test_accuracy": jnp.sum((jnp.argmax(logits, -1) == batch.y) * batch.mask),
        }

    return FederatedAlgorithm(
        name=name, server_init=server_init, persistent_init=persistent_init,
        client_init=client_init, client_step=client_step, client_finish=client_finish,
        server_update=server_update, evaluate=evaluate, num_params=num_params,
    )


def layer_sizes(model: nn.Module, sample_x: jax.Array) -> list[int]:
    """Sizes of the parameter leaves in flat-vector order (for per-layer scales)."""
    shapes = jax.eval_shape(lambda k: init_dense_params(model, sample_x, k), jax.random.key(0))
    return [int(s.size) for s in jax.tree.leaves(shapes)]
