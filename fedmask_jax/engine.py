"""The round engine: one jitted function trains a whole cohort and aggregates it.

``round(server_state, persistent_store, data, cohort, valid, key)``:

1. the server state is broadcast (closed over, not copied) to the cohort's clients;
2. clients are trained in chunks: ``client_chunk_size`` clients at once under ``vmap``, the
   chunks one after another under ``lax.scan``, so memory is bounded by the chunk and the
   compiled program does not grow with the cohort. Chunk 1 is a per-client loop inside the
   jitted round -- the fast form for convolutions on XLA:CPU, where a vmapped conv becomes a
   slow grouped conv (DESIGN section 4);
3. each client's local training is a ``lax.scan`` over epochs and steps. Clients with fewer
   examples than the largest client run the same number of steps with the extra steps
   masked out (state unchanged), and their last batch masks its padding rows;
4. client contributions are summed over the cohort and handed to ``server_update``.

Every random draw of a client is keyed by (round key, client id, epoch, step) or
(round key, client id, example index), so a client's result does not depend on how much it
was padded, on the chunk size or on which other clients share its round.

The engine knows nothing about masks: everything method-specific is in the
``FederatedAlgorithm`` it is given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedmask_jax.algorithms.base import Batch, FederatedAlgorithm, PyTree


class ClientData(NamedTuple):
    """The training set on the device, and which examples belong to which client.

    ``index[c, :sizes[c]]`` are the rows of ``x``/``y`` held by client ``c``; the rest of the
    row is padding.
    """

    x: jax.Array  # [num_examples, ...] raw (uint8) inputs
    y: jax.Array  # [num_examples] int32 labels
    index: jax.Array  # [num_clients, max_client_size] int32
    sizes: jax.Array  # [num_clients] int32


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 128
    local_epochs: int = 3
    client_chunk_size: int = 1  # clients vmapped together; chunks run in sequence


def client_data_from_partition(
    x: np.ndarray, y: np.ndarray, partition: list[np.ndarray]
) -> ClientData:
    """Puts a partitioned dataset on the device once, as ``ClientData``."""
    sizes = np.array([len(p) for p in partition], np.int32)
    index = np.zeros((len(partition), int(sizes.max())), np.int32)
    for c, p in enumerate(partition):
        index[c, : len(p)] = p
    return ClientData(
        jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(index), jnp.asarray(sizes)
    )


def sample_cohort(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
    """Uniform sampling without replacement, keyed by (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)


def pad_cohort(cohort: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads a cohort to a multiple of ``chunk`` with dummy clients of weight 0."""
    k = len(cohort)
    padded = -(-k // chunk) * chunk
    ids = np.zeros(padded, np.int32)
    ids[:k] = cohort
    valid = np.zeros(padded, np.float32)
    valid[:k] = 1.0
    return ids, valid


def _where_tree(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _train_client(alg: FederatedAlgorithm, cfg: EngineConfig, data: ClientData,
                  server: PyTree, persistent: PyTree, cid: jax.Array, key: jax.Array):
    """Local training of one client, then its message. Traced under vmap over clients."""
    max_n = data.index.shape[1]
    b = cfg.batch_size
    steps = -(-max_n // b)
    n = data.sizes[cid]
    rows = data.index[cid]
    shuffle_key, step_key, finish_key = (jax.random.fold_in(key, i) for i in range(3))
    positions = jnp.arange(max_n)

    def epoch(state, e):
        ekey = jax.random.fold_in(shuffle_key, e)
        # One uniform per example index: a reshuffle that ignores how much padding follows.
        r = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(ekey, i)))(positions)
        order = jnp.argsort(jnp.where(positions < n, r, 2.0), stable=True)
        order = jnp.pad(order, (0, steps * b - max_n)).reshape(steps, b)

        def step(state, s):
            batch_rows = rows[order[s]]
            example_mask = (s * b + jnp.arange(b)) < n
            batch = Batch(data.x[batch_rows], data.y[batch_rows], example_mask.astype(jnp.float32))
            skey = jax.random.fold_in(jax.random.fold_in(step_key, e), s)
            new_state, loss = alg.client_step(server, state, batch, skey)
            active = s * b < n
            return _where_tree(active, new_state, state), (loss, active)

        return jax.lax.scan(step, state, jnp.arange(steps))

    state = alg.client_init(server, persistent)
    state, (losses, active) = jax.lax.scan(epoch, state, jnp.arange(cfg.local_epochs))
    train_loss = jnp.sum(losses * active) / jnp.maximum(jnp.sum(active), 1)
    result = alg.client_finish(server, state, persistent, n, finish_key)
    metrics = dict(result.metrics, train_loss=train_loss, num_examples=n.astype(jnp.float32))
    return result._replace(metrics=metrics)


def make_round_fn(alg: FederatedAlgorithm, cfg: EngineConfig):
    """Returns ``round(server, store, data, cohort, valid, key) -> (server, store, metrics)``.

    ``cohort`` holds client ids padded to a multiple of ``cfg.client_chunk_size`` and
    ``valid`` is 1 for real clients, 0 for padding. ``store`` holds every client's persistent
    state with a leading client axis (``()`` for methods that keep none). Metrics are cohort
    means of the per-client metrics.
    """
    chunk = cfg.client_chunk_size

    def round_fn(server, store, data: ClientData, cohort, valid, key):
        def train_chunk(store, ids, keys):
            persistent = jax.tree.map(lambda p: p[ids], store)
            train = lambda p, c, k: _train_client(alg, cfg, data, server, p, c, k)  # noqa: E731
            return jax.vmap(train)(persistent, ids, keys)

        num_clients = data.index.shape[0]
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, cohort)
        chunks = (cohort.reshape(-1, chunk), valid.reshape(-1, chunk),
                  keys.reshape(-1, chunk, *keys.shape[1:]))
        zero = jax.tree.map(
            lambda s: jnp.zeros(s.shape[1:], s.dtype),
            jax.eval_shape(train_chunk, store, chunks[0][0], chunks[2][0]),
        )
        zero = (zero.contribution, zero.metrics)

        def body(carry, xs):
            (acc_contrib, acc_metrics), store = carry
            ids, v, ks = xs
            result = train_chunk(store, ids, ks)
            weighted_sum = lambda acc, x: acc + jnp.tensordot(v, x, axes=1)  # noqa: E731
            acc_contrib = jax.tree.map(weighted_sum, acc_contrib, result.contribution)
            acc_metrics = jax.tree.map(weighted_sum, acc_metrics, result.metrics)
            # Padding clients write nowhere: their id is pushed out of bounds and dropped.
            write_ids = jnp.where(v > 0, ids, num_clients)
            store = jax.tree.map(
                lambda s, p: s.at[write_ids].set(p, mode="drop"), store, result.persistent
            )
            return ((acc_contrib, acc_metrics), store), None

        ((contrib, metrics), store), _ = jax.lax.scan(body, (zero, store), chunks)
        k = jnp.sum(valid)
        server = alg.server_update(server, contrib, k)
        metrics = {name: value / k for name, value in metrics.items()}
        return server, store, metrics

    return jax.jit(round_fn, donate_argnums=(0, 1))


def make_eval_fn(alg: FederatedAlgorithm, eval_batch_size: int):
    """Returns ``evaluate(server, x, y, key) -> {metric: mean over examples}``.

    The test set is scanned in batches; each batch gets its own key (so a sampled-mask
    evaluation draws a fresh mask per test batch, as the reference does).
    """

    def eval_fn(server, x, y, key):
        m = x.shape[0]
        nb = -(-m // eval_batch_size)
        pad = nb * eval_batch_size - m
        xb = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(nb, eval_batch_size, *x.shape[1:])
        yb = jnp.pad(y, (0, pad)).reshape(nb, eval_batch_size)
        mb = (jnp.arange(nb * eval_batch_size) < m).astype(jnp.float32).reshape(nb, -1)

        def body(acc, xs):
            i, bx, by, bm = xs
            sums = alg.evaluate(server, Batch(bx, by, bm), jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, acc, sums), None

        zero = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(alg.evaluate, server, Batch(xb[0], yb[0], mb[0]), key),
        )
        sums, _ = jax.lax.scan(body, zero, (jnp.arange(nb), xb, yb, mb))
        return {k: v / m for k, v in sums.items()}

    return jax.jit(eval_fn)


def init_store(alg: FederatedAlgorithm, num_clients: int) -> PyTree:
    """Every client's persistent state, stacked on a leading client axis."""
    one = alg.persistent_init()
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients, *p.shape)).copy(), one)


def auto_chunk_size(cohort_size: int, num_params: int, *, conv: bool, backend: str,
                    memory_budget_bytes: float | None = None) -> int:
    """How many clients to vmap together, chosen per backend (DESIGN section 4).

    On XLA:CPU a vmapped convolution becomes a grouped convolution whose gradient runs ~35x
    slower than a plain one, so conv clients run one at a time there. Everywhere else clients
    are vmapped, as many as fit a memory budget (scores, optimizer state, gradients and
    masks: ~8 copies of the parameters per client), preferring a divisor of the cohort so no
    padding clients are trained.
    """
    if backend == "cpu" and conv:
        return 1
    if memory_budget_bytes is None:
        memory_budget_bytes = 2e9 if backend == "cpu" else 8e9
    per_client = 8 * 4 * num_params
    limit = int(max(1, min(cohort_size, memory_budget_bytes // per_client)))
    divisors = [d for d in range(limit, 0, -1) if cohort_size % d == 0]
    best = divisors[0]
    # A divisor much smaller than the limit wastes parallelism; padding is cheaper then.
    return best if best * 2 >= limit else limit


def steps_per_round(max_client_size: int, cfg: EngineConfig) -> int:
    return cfg.local_epochs * math.ceil(max_client_size / cfg.batch_size)
