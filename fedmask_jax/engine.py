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
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, PartitionSpec

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
    cpu_ynn_fusions: bool = False  # keep XLA:CPU's YNNPACK fusions (see compiler_options)


# XLA:CPU in jaxlib 0.10 hands convolutions, reductions and some elementwise ops to YNNPACK
# ("ynn_fusion"s). Its convolutions, and the layout copies around them, are slower than XLA's
# own Eigen kernels for Conv4's layers on this 2-core x86 host: forward, input and filter
# gradient of the 28x28x64->64 layer take 256.4 ms with YNNPACK and 150.1 ms without
# (experiments/bench_conv.py); a Conv4 round runs 1.24x faster without, MLP rounds the same
# (docs/benchmarks.md).
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(cfg: EngineConfig, backend: str | None = None) -> dict[str, str] | None:
    """XLA options for every program the engine compiles (``jax.jit(compiler_options=...)``).

    Passed per program rather than through ``XLA_FLAGS`` so that they hold however and
    whenever the process started JAX, and touch nothing else the process compiles.
    """
    if (backend or jax.default_backend()) != "cpu" or cfg.cpu_ynn_fusions:
        return None
    return dict(_NO_YNN)


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


def _over_clients(fn, chunk: int):
    """Maps ``fn`` over a leading client axis of all its arguments.

    A chunk of one is squeezed rather than vmapped: a vmap of size one still turns a conv
    with per-client kernels into a grouped conv.
    """
    if chunk > 1:
        return jax.vmap(fn)

    def single(*args):
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda x: x[None], out)

    return single


# -- One client's local training, in pieces shared by both execution strategies. ----------

def _client_keys(key):
    return tuple(jax.random.fold_in(key, i) for i in range(3))  # shuffle, step, finish


def _epoch_order(shuffle_key, e, n, max_n: int, steps: int, b: int):
    """Row positions of each step's batch in epoch ``e``: a reshuffle of the n real examples.

    One uniform per example index, so the order of the real examples ignores how much
    padding follows them.
    """
    ekey = jax.random.fold_in(shuffle_key, e)
    positions = jnp.arange(max_n)
    r = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(ekey, i)))(positions)
    order = jnp.argsort(jnp.where(positions < n, r, 2.0), stable=True)
    return jnp.pad(order, (0, steps * b - max_n)).reshape(steps, b)


def _local_step(alg, data: ClientData, server, state, rows, order, n, e, s, step_key, b: int):
    """Step ``s`` of epoch ``e``; a step past the client's data leaves the state unchanged."""
    batch_rows = rows[order[s]]
    example_mask = ((s * b + jnp.arange(b)) < n).astype(jnp.float32)
    batch = Batch(data.x[batch_rows], data.y[batch_rows], example_mask)
    skey = jax.random.fold_in(jax.random.fold_in(step_key, e), s)
    new_state, loss = alg.client_step(server, state, batch, skey)
    active = s * b < n
    return _where_tree(active, new_state, state), loss * active, active.astype(jnp.float32)


def _finish(alg, server, state, persistent, n, finish_key, loss_sum, active_steps):
    result = alg.client_finish(server, state, persistent, n, finish_key)
    metrics = dict(result.metrics, train_loss=loss_sum / jnp.maximum(active_steps, 1.0),
                   num_examples=n.astype(jnp.float32))
    return result._replace(metrics=metrics)


def _accumulate(acc, store, result, ids, valid, num_clients: int):
    """Adds a chunk's contributions and metrics (weighted by ``valid``) and stores its state."""
    weighted_sum = lambda a, x: a + jnp.tensordot(valid, x, axes=1)  # noqa: E731
    acc = jax.tree.map(weighted_sum, acc, (result.contribution, result.metrics))
    # Padding clients write nowhere: their id is pushed out of bounds and dropped.
    write_ids = jnp.where(valid > 0, ids, num_clients)
    store = jax.tree.map(lambda s, p: s.at[write_ids].set(p, mode="drop"), store, result.persistent)
    return acc, store


def _finish_round(alg, server, acc, valid, k=None, update: bool = True):
    contrib, metrics = acc
    k = jnp.sum(valid) if k is None else k
    if update:
        server = alg.server_update(server, contrib, k)
    return server, {name: value / k for name, value in metrics.items()}


def _zeros_like_result(result_shape):
    return jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype),
                        (result_shape.contribution, result_shape.metrics))


def _train_client(alg: FederatedAlgorithm, cfg: EngineConfig, data: ClientData,
                  server: PyTree, persistent: PyTree, cid: jax.Array, key: jax.Array):
    """Local training of one client as nested scans (epochs, steps), then its message."""
    max_n, b = data.index.shape[1], cfg.batch_size
    steps = -(-max_n // b)
    n, rows = data.sizes[cid], data.index[cid]
    shuffle_key, step_key, finish_key = _client_keys(key)

    def epoch(state, e):
        order = _epoch_order(shuffle_key, e, n, max_n, steps, b)

        def step(state, s):
            state, loss, active = _local_step(alg, data, server, state, rows, order, n, e, s,
                                              step_key, b)
            return state, (loss, active)

        return jax.lax.scan(step, state, jnp.arange(steps))

    state = alg.client_init(server, persistent)
    state, (losses, active) = jax.lax.scan(epoch, state, jnp.arange(cfg.local_epochs))
    return _finish(alg, server, state, persistent, n, finish_key, jnp.sum(losses),
                   jnp.sum(active))


STRATEGIES = ("scan", "host_loop")


CLIENTS_AXIS = "clients"


def clients_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` devices (0 = all).

    Built from ``Mesh`` directly: ``jax.make_mesh`` gives Explicit axes in JAX 0.10, which
    reject the unsharded (replicated) inputs the round takes.
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"--num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (CLIENTS_AXIS,))


def make_round_fn(alg: FederatedAlgorithm, cfg: EngineConfig, strategy: str = "scan",
                  mesh: Mesh | None = None, collect_uplink: bool = False):
    """Returns ``round(server, store, data, cohort, valid, key) -> (server, store, metrics)``.

    ``cohort`` holds client ids padded to a multiple of ``cfg.client_chunk_size`` and
    ``valid`` is 1 for real clients, 0 for padding. ``store`` holds every client's persistent
    state with a leading client axis (``()`` for methods that keep none). Metrics are cohort
    means of the per-client metrics.

    ``strategy="scan"`` compiles the whole round (chunks, epochs, steps) into one program.
    ``strategy="host_loop"`` drives chunks, epochs and steps from Python, one jitted step at a
    time: XLA:CPU runs a convolution inside a loop body (``while``) tens of times slower than
    the same convolution at top level (jax-ml/jax#12868; measured here: 3.4 vs 172 Conv4
    examples/s), so on CPU conv models the loop must stay outside the compiled program. Both
    strategies draw the same random numbers and give the same results.

    ``mesh`` (scan only): shard the cohort over its ``clients`` axis; the cohort must then be
    padded to a multiple of ``client_chunk_size * mesh.size``.

    ``collect_uplink``: the round also returns every client's ``alg.uplink_payload`` (in
    cohort order, padding included) and leaves the server state *unchanged*: the caller codes
    and decodes the messages and applies ``alg.server_update`` to what it decoded.
    """
    if collect_uplink and alg.uplink_payload is None:
        raise ValueError(f"{alg.name} has no uplink_payload to collect")
    if strategy == "scan":
        return _ScanRound(alg, cfg, mesh if mesh is not None and mesh.size > 1 else None,
                          collect_uplink)
    if strategy == "host_loop":
        return _HostLoopRound(alg, cfg, collect_uplink)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


class _ScanRound:
    """The whole round as one jitted program, optionally sharded over a ``clients`` mesh axis.

    With a mesh, each device trains its slice of the cohort (chunked as usual) and the
    per-device sums are combined with ``psum`` over ``clients`` -- DrJAX's map/reduce shape
    written with ``jax.shard_map``. Persistent client states are updated where their client
    trained and summed back as deltas, so every device ends with the same store.
    """

    def __init__(self, alg: FederatedAlgorithm, cfg: EngineConfig, mesh: Mesh | None = None,
                 collect_uplink: bool = False):
        chunk = cfg.client_chunk_size
        axis = CLIENTS_AXIS if mesh is not None else None
        payload = jax.vmap(alg.uplink_payload) if collect_uplink else None

        def round_fn(server, store, data: ClientData, cohort, valid, key):
            num_clients = data.index.shape[0]

            def train_chunk(store, ids, keys):
                persistent = jax.tree.map(lambda p: p[ids], store)
                train = lambda p, c, k: _train_client(alg, cfg, data, server, p, c, k)  # noqa: E731
                return _over_clients(train, chunk)(persistent, ids, keys)

            keys = jax.vmap(jax.random.fold_in, (None, 0))(key, cohort)
            chunks = (cohort.reshape(-1, chunk), valid.reshape(-1, chunk),
                      keys.reshape(-1, chunk, *keys.shape[1:]))
            zero = _zeros_like_result(jax.eval_shape(train_chunk, store, chunks[0][0], chunks[2][0]))

            def body(carry, xs):
                acc, store = carry
                ids, v, ks = xs
                result = train_chunk(store, ids, ks)
                uplink = payload(result.contribution) if payload else None
                return _accumulate(acc, store, result, ids, v, num_clients), uplink

            (acc, new_store), uplink = jax.lax.scan(body, (zero, store), chunks)
            k = jnp.sum(valid)
            if axis is not None:
                acc, k = jax.lax.psum((acc, k), axis)
                new_store = jax.tree.map(lambda old, new: old + jax.lax.psum(new - old, axis),
                                         store, new_store)
            server, metrics = _finish_round(alg, server, acc, valid, k, update=not collect_uplink)
            if collect_uplink:
                return server, new_store, metrics, uplink.reshape(-1, uplink.shape[-1])
            return server, new_store, metrics

        if mesh is not None:
            rep, split = PartitionSpec(), PartitionSpec(CLIENTS_AXIS)
            # check_vma=False: the mask's custom VJP returns theta * g, a cotangent that varies
            # over devices for a theta that does not, which the manual-axis type check rejects.
            round_fn = jax.shard_map(round_fn, mesh=mesh,
                                     in_specs=(rep, rep, rep, split, split, rep),
                                     out_specs=(rep, rep, rep) + ((split,) if collect_uplink else ()),
                                     check_vma=False)
        self._jit = jax.jit(round_fn, donate_argnums=(0, 1), compiler_options=compiler_options(cfg))
        self._compiled = None

    def compile(self, *args) -> float:
        t0 = time.perf_counter()
        self._compiled = self._jit.lower(*args).compile()
        return time.perf_counter() - t0

    def __call__(self, *args):
        return (self._compiled or self._jit)(*args)


class _HostLoopRound:
    """Chunks, epochs and steps driven from Python; each piece is a small jitted function."""

    def __init__(self, alg: FederatedAlgorithm, cfg: EngineConfig, collect_uplink: bool = False):
        self.cfg = cfg
        chunk, b = cfg.client_chunk_size, cfg.batch_size

        def begin(server, store, data, ids, keys):
            persistent = jax.tree.map(lambda p: p[ids], store)
            states = _over_clients(lambda p: alg.client_init(server, p), chunk)(persistent)
            return states, persistent, jax.vmap(_client_keys)(keys)

        def order(data, ids, shuffle_keys, e):
            max_n = data.index.shape[1]
            steps = -(-max_n // b)
            return jax.vmap(lambda c, k: _epoch_order(k, e, data.sizes[c], max_n, steps, b))(
                ids, shuffle_keys)

        def step(server, states, data, ids, orders, step_keys, e, s, loss_sum, active_sum):
            def one(state, c, order, k):
                return _local_step(alg, data, server, state, data.index[c], order,
                                   data.sizes[c], e, s, k, b)
            states, loss, active = _over_clients(one, chunk)(states, ids, orders, step_keys)
            return states, loss_sum + loss, active_sum + active

        def finish_chunk(server, states, persistent, data, ids, finish_keys, loss_sum, active_sum):
            def one(state, p, c, k, ls, act):
                return _finish(alg, server, state, p, data.sizes[c], k, ls, act)
            return _over_clients(one, chunk)(states, persistent, ids, finish_keys, loss_sum,
                                             active_sum)

        def accumulate(acc, store, result, ids, valid, data):
            return _accumulate(acc, store, result, ids, valid, data.index.shape[0])

        jit = functools.partial(jax.jit, compiler_options=compiler_options(cfg))
        self._begin = jit(begin)
        self._order = jit(order)
        self._step = jit(step, donate_argnums=(1, 8, 9))
        self._finish_chunk = jit(finish_chunk)
        self._accumulate = jit(accumulate, donate_argnums=(0, 1))
        self._finish_round = jit(
            lambda server, acc, valid: _finish_round(alg, server, acc, valid,
                                                     update=not collect_uplink))
        self._payload = jit(jax.vmap(alg.uplink_payload)) if collect_uplink else None

    def _pieces(self, server, store, data, cohort, valid, key, run: bool):
        """Walks one round's pieces, either running them or only lowering and compiling them.

        With ``run=False`` the arguments may be shapes (``jax.ShapeDtypeStruct``) and each
        piece is compiled once on its abstract inputs (one step stands for all steps).
        """
        chunk, b = self.cfg.client_chunk_size, self.cfg.batch_size
        call = (lambda fn, *a: fn(*a)) if run else (
            lambda fn, *a: (fn.lower(*a).compile(), jax.eval_shape(fn, *a))[1])
        if run:
            sizes, cohort_host = np.asarray(data.sizes), np.asarray(cohort)
        keys = jax.eval_shape(lambda k, c: jax.vmap(jax.random.fold_in, (None, 0))(k, c), key,
                              cohort) if not run else jax.vmap(jax.random.fold_in, (None, 0))(key, cohort)
        acc, uplinks = None, []
        for start in range(0, cohort.shape[0], chunk):
            sl = slice(start, start + chunk)
            ids, v, ks = (cohort[sl], valid[sl], keys[sl]) if run else (
                jax.ShapeDtypeStruct((chunk,), cohort.dtype),
                jax.ShapeDtypeStruct((chunk,), valid.dtype),
                jax.ShapeDtypeStruct((chunk, *keys.shape[1:]), keys.dtype))
            states, persistent, (shuffle_k, step_k, finish_k) = call(self._begin, server, store, data, ids, ks)
            # Steps past the largest client of this chunk change nothing: skip them.
            steps = -(-int(sizes[cohort_host[sl]].max()) // b) if run else 1
            loss_sum = jnp.zeros((chunk,), jnp.float32)
            active_sum = jnp.zeros((chunk,), jnp.float32)
            for e in range(self.cfg.local_epochs if run else 1):
                orders = call(self._order, data, ids, shuffle_k, e)
                for s in range(steps):
                    states, loss_sum, active_sum = call(
                        self._step, server, states, data, ids, orders, step_k, e, s, loss_sum,
                        active_sum)
            result = call(self._finish_chunk, server, states, persistent, data, ids, finish_k,
                          loss_sum, active_sum)
            if acc is None:
                acc = _zeros_like_result(result)
            if self._payload is not None:
                uplinks.append(call(self._payload, result.contribution))
            acc, store = call(self._accumulate, acc, store, result, ids, v, data)
            if not run:
                break  # every chunk has the same shapes
        server, metrics = call(self._finish_round, server, acc, valid)
        if self._payload is not None:
            return server, store, metrics, jnp.concatenate(uplinks) if run else None
        return server, store, metrics

    def compile(self, *args) -> float:
        t0 = time.perf_counter()
        self._pieces(*args, run=False)
        return time.perf_counter() - t0

    def __call__(self, *args):
        return self._pieces(*args, run=True)


def make_eval_fn(alg: FederatedAlgorithm, eval_batch_size: int,
                 options: dict[str, str] | None = None):
    """Returns ``evaluate(server, x, y, key) -> {metric: mean over examples}``.

    ``options``: XLA compiler options, e.g. ``compiler_options(cfg)``.

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

    return jax.jit(eval_fn, compiler_options=options)


def init_store(alg: FederatedAlgorithm, num_clients: int) -> PyTree:
    """Every client's persistent state, stacked on a leading client axis."""
    one = alg.persistent_init()
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients, *p.shape)).copy(), one)


def auto_strategy(*, conv: bool, backend: str) -> str:
    """The whole round in one program, except conv models on XLA:CPU (see make_round_fn)."""
    return "host_loop" if (backend == "cpu" and conv) else "scan"


def cpu_cache_bytes(default: int = 32 * 2**20) -> int:
    """The last-level cache of this host (L3 from sysconf, else L2), or ``default``."""
    import os

    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size and size > 0:
            return int(size)
    return default


def auto_chunk_size(cohort_size: int, num_params: int, *, conv: bool, backend: str,
                    memory_budget_bytes: float | None = None) -> int:
    """How many clients to vmap together, chosen per backend (DESIGN section 4).

    On XLA:CPU a vmapped convolution becomes a grouped convolution whose gradient runs ~35x
    slower than a plain one, so conv clients run one at a time there. Everywhere else clients
    are vmapped, as many as fit a memory budget (scores, optimizer state, gradients and
    masks: ~8 copies of the parameters per client), preferring a divisor of the cohort so no
    padding clients are trained.

    On CPU the budget is the last-level cache, with at least two clients: a chunk whose
    working set stays in cache trains fastest. Measured here (32 MiB L3, MLP 784-300-100-10,
    100 clients x 128 examples x 3 epochs; docs/benchmarks.md): chunk 1 / 2 / 4 / 10 / 25 /
    100 ran 1.15 / 1.34 / 1.17 / 0.92 / 0.83 / 0.75 rounds/s. On GPU/TPU the budget is 8 GB of
    device memory.
    """
    if backend == "cpu" and conv:
        return 1
    per_client = 8 * 4 * num_params
    if memory_budget_bytes is None:
        memory_budget_bytes = max(cpu_cache_bytes(), 2 * per_client) if backend == "cpu" else 8e9
    limit = int(max(1, min(cohort_size, memory_budget_bytes // per_client)))
    divisors = [d for d in range(limit, 0, -1) if cohort_size % d == 0]
    best = divisors[0]
    # A divisor much smaller than the limit wastes parallelism; padding is cheaper then.
    return best if best * 2 >= limit else limit
