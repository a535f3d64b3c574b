"""What the round reads and keeps per client: the training set on the device with each
client's rows (``ClientData``), and every client's persistent state (``init_store``)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedmask_jax.algorithms.base import FederatedAlgorithm, PyTree


class ClientData(NamedTuple):
    """The training set on the device, and which examples belong to which client.

    ``index[c, :sizes[c]]`` are the rows of ``x``/``y`` held by client ``c``; the rest of the
    row is padding.
    """

    x: jax.Array  # [num_examples, ...] raw (uint8) inputs
    y: jax.Array  # [num_examples] int32 labels
    index: jax.Array  # [num_clients, max_client_size] int32
    sizes: jax.Array  # [num_clients] int32


def client_data_from_partition(x: np.ndarray, y: np.ndarray, partition: list[np.ndarray],
                               width: int | None = None) -> ClientData:
    """Puts a partitioned dataset on the device once, as ``ClientData``; ``width``: pad each
    client's row of the index to this many examples (default: the largest client)."""
    sizes = np.array([len(p) for p in partition], np.int32)
    index = np.zeros((len(partition), max(int(sizes.max()), width or 0)), np.int32)
    for c, p in enumerate(partition):
        index[c, : len(p)] = p
    data = ClientData(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(index), jnp.asarray(sizes))
    check_client_data(data)
    return data


def check_client_data(data: ClientData) -> None:
    """The invariants every round relies on (shapes and dtypes; static, so free under jit)."""
    chex.assert_rank([data.y, data.index, data.sizes], [1, 2, 1])
    chex.assert_equal(data.x.shape[0], data.y.shape[0])
    chex.assert_equal(data.index.shape[0], data.sizes.shape[0])
    chex.assert_type([data.y, data.index, data.sizes], jnp.int32)


def init_store(alg: FederatedAlgorithm, num_clients: int) -> PyTree:
    """Every client's persistent state, stacked on a leading client axis."""
    one = alg.persistent_init()
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients, *p.shape)).copy(), one)


def init_contributions(alg: FederatedAlgorithm, server: PyTree, slots: int) -> PyTree:
    """Zeros for ``slots`` clients' contributions (``Contributions.values``), their shapes
    read off ``client_finish`` without computing it."""
    def one():
        state = alg.client_init(server, alg.persistent_init())
        return alg.client_finish(server, state, alg.persistent_init(), jnp.int32(1), jax.random.key(0)).contribution
    return jax.tree.map(lambda s: jnp.zeros((slots, *s.shape), s.dtype), jax.eval_shape(one))
