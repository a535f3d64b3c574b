"""The round engine: one round trains a whole cohort and aggregates it.

``round(server, store, data, cohort, key) -> RoundOutput(server, store, metrics, collected)``

1. the server state is broadcast (closed over, not copied) to the cohort's clients;
2. clients are trained in chunks: ``client_chunk_size`` clients at once under ``vmap``, the
   chunks one after another, so memory is bounded by the chunk and the compiled program does
   not grow with the cohort. A chunk of one is a plain per-client loop -- the fast form for
   convolutions on XLA:CPU, where a vmapped conv becomes a slow grouped conv. A vmapped
   chunk's gradients are each client's own (``client_grad="per_client"``) or the gradient of
   the chunk's summed objective (``"summed"``: the same numbers, a better grouped-conv
   filter gradient);
3. each client runs the same number of local steps; steps past a client's data, or past its
   step budget for the round (``Cohort.steps``: heterogeneous local work), leave its state
   unchanged, and its last batch masks its padding rows;
4. client contributions are summed over the cohort (and over devices, ``psum`` on the
   ``clients`` mesh axis) and handed to ``server_update``; the messages of a few chosen cohort
   positions are collected for the host to check (``Cohort.collect``). A round in which no
   client reports (all dropped or unavailable) leaves the server state as it was.

The round's orchestration is written once, in ``_round_program``, against a small ``Loop``
interface: ``call`` a stage, ``fori`` a loop, ``take`` a chunk of the cohort. Three loops run
it: ``_InProgram`` traces everything into one jitted program (``lax.fori_loop``);
``_HostDriven`` runs the loops in Python over small jitted stages (XLA:CPU runs a convolution
inside a compiled loop tens of times slower than at top level); ``_Compiling`` walks the same
control flow once on abstract shapes to compile every stage ahead of time.

Every random draw of a client is keyed by (round key, client id, epoch, step) or
(round key, client id, example index), so a client's result does not depend on how much it
was padded, on the chunk size, on the loop or on which other clients share its round.

The engine knows nothing about masks: everything method-specific is in the
``FederatedAlgorithm`` it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fedmask_jax.algorithms.base import Batch, ClientResult, FederatedAlgorithm, PyTree

STRATEGIES = ("scan", "host_loop")
CLIENT_GRADS = ("per_client", "summed")
CLIENTS_AXIS = "clients"
RUNS_AXIS = "runs"


class ClientData(NamedTuple):
    """The training set on the device, and which examples belong to which client.

    ``index[c, :sizes[c]]`` are the rows of ``x``/``y`` held by client ``c``; the rest of the
    row is padding.
    """

    x: jax.Array  # [num_examples, ...] raw (uint8) inputs
    y: jax.Array  # [num_examples] int32 labels
    index: jax.Array  # [num_clients, max_client_size] int32
    sizes: jax.Array  # [num_clients] int32


class Cohort(NamedTuple):
    """One round's clients, padded to a multiple of the chunk (times the devices).

    Real clients come first; padding clients (and clients whose work does not count, such as
    dropped stragglers) have ``valid`` 0 and count for nothing. ``collect[p]`` is the slot of
    cohort position ``p`` in ``RoundOutput.collected`` or, for positions whose messages are
    not collected, the number of slots (out of range). ``steps[p]``: the most local steps
    (over all epochs) position ``p`` may take this round; ``ALL_STEPS`` for its full work.
    """

    ids: Any  # [P] int32
    valid: Any  # [P] float32
    collect: Any  # [P] int32
    steps: Any  # [P] int32


ALL_STEPS = 2**30  # a step budget no client reaches: its full local work


class Collected(NamedTuple):
    """The messages of the collected cohort positions, in slot order."""

    payload: jax.Array  # [slots, payload bytes] uint8: alg.uplink_payload of the contribution
    metrics: dict[str, jax.Array]  # [slots] each: that client's own metrics


class RoundOutput(NamedTuple):
    server: PyTree
    store: PyTree  # every client's persistent state (leading client axis)
    metrics: dict[str, jax.Array]  # means over the cohort's real clients
    collected: Collected | None  # None when the round collects no messages


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 128
    local_epochs: int = 3
    client_chunk_size: int = 1  # clients vmapped together; chunks run in sequence
    # How a vmapped chunk's gradients are taken (chunks of one: always each client's own):
    # per_client vmaps each client's client_step; summed differentiates the sum of the chunk's
    # objectives (methods with a separable step only, see FederatedAlgorithm) -- the same
    # gradients, but a grouped conv's filter gradient becomes cuDNN's grouped backward-filter
    # kernel instead of a forward conv over transposed copies of the activations.
    client_grad: str = "per_client"
    cpu_ynn_fusions: bool = False  # keep XLA:CPU's YNNPACK fusions (see compiler_options)
    collect: int = 0  # cohort positions whose messages the round hands back
    runs_vectorized: int = 0  # of a program's runs, how many are vmapped together (0 = all)


# XLA:CPU in jaxlib 0.10 hands convolutions, reductions and some elementwise ops to YNNPACK
# ("ynn_fusion"s), whose kernels are slower than XLA's own for Conv4's layers on x86
# (docs/benchmarks.md: per layer and per round).
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(cfg: EngineConfig, backend: str | None = None) -> dict[str, str] | None:
    """XLA options for every program the engine compiles (``jax.jit(compiler_options=...)``).

    Passed per program rather than through ``XLA_FLAGS`` so that they hold however and
    whenever the process started JAX, and touch nothing else the process compiles.
    """
    if (backend or jax.default_backend()) != "cpu" or cfg.cpu_ynn_fusions:
        return None
    return dict(_NO_YNN)


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


def sample_cohort(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
    """Uniform sampling without replacement, keyed by (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)


def make_cohort(clients: np.ndarray, multiple: int, collect: int = 0, seed: int = 0,
                round_index: int = 0, *, steps: np.ndarray | None = None, valid: np.ndarray | None = None,
                size: int = 0) -> Cohort:
    """Pads ``clients`` to a multiple of ``multiple`` (and to at least ``size`` positions, so
    that rounds with fewer clients keep the program's shapes) and picks ``collect`` of its
    positions (uniformly, keyed by (seed, round)) whose messages the round hands back.
    ``steps``/``valid``: each client's step budget and weight (default: full work, 1)."""
    k = len(clients)
    padded = -(-max(k, size, 1) // multiple) * multiple
    ids = np.zeros(padded, np.int32)
    ids[:k] = clients
    weights = np.zeros(padded, np.float32)
    weights[:k] = 1.0 if valid is None else valid
    budget = np.full(padded, ALL_STEPS, np.int32)
    if steps is not None:
        budget[:k] = steps
    slots = np.full(padded, collect, np.int32)
    if collect:
        if collect > padded:
            raise ValueError(f"cannot collect {collect} messages from a cohort of {padded}")
        # Only reporting clients' messages are collected: the first min(collect, reporting)
        # slots are filled, the rest stay empty.
        reporting = np.flatnonzero(weights[:k] > 0)
        taken = min(collect, len(reporting))
        chosen = reporting[np.random.default_rng([seed, round_index, 1]).choice(len(reporting), taken, replace=False)]
        slots[np.sort(chosen)] = np.arange(taken, dtype=np.int32)
    return Cohort(ids, weights, slots, budget)


def _where_tree(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _over_clients(fn, chunk: int):
    """Maps ``fn`` over a leading client axis of all its arguments (the first of which must
    be an array: the clients' ids, so that the map always has an axis to map over).

    A chunk of one is squeezed rather than vmapped: a vmap of size one still turns a conv
    with per-client kernels into a grouped conv.
    """
    if chunk > 1:
        return jax.vmap(fn)

    def single(*args):
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda x: x[None], out)

    return single


class ChunkState(NamedTuple):
    """A chunk of clients in the middle of local training (leading axis: the chunk)."""

    states: PyTree
    persistent: PyTree
    shuffle_keys: jax.Array
    step_keys: jax.Array
    finish_keys: jax.Array
    loss_sum: jax.Array
    active_steps: jax.Array
    budget: jax.Array  # each client's most steps this round (Cohort.steps)


class Accumulator(NamedTuple):
    """What the chunks add up to: contribution and metric sums, the store, collected messages."""

    sums: tuple[PyTree, dict[str, jax.Array]]
    store: PyTree
    collected: Collected | None


class _Stages:
    """The round's stages as pure functions over a chunk of clients; ``_round_program``
    strings them together and a ``Loop`` decides how each is run."""

    def __init__(self, alg: FederatedAlgorithm, cfg: EngineConfig, axis: str | None):
        if cfg.collect and alg.uplink_payload is None:
            raise ValueError(f"{alg.name} has no uplink_payload to collect")
        if cfg.client_grad not in CLIENT_GRADS:
            raise ValueError(f"unknown client_grad {cfg.client_grad!r}; expected one of {CLIENT_GRADS}")
        if cfg.client_grad == "summed" and not alg.separable_step:
            raise ValueError(f"client_grad='summed' needs {alg.name}'s step as client_params, "
                             "client_loss and client_apply")
        self.alg, self.cfg, self.axis = alg, cfg, axis
        self.chunk, self.b = cfg.client_chunk_size, cfg.batch_size
        self.summed = cfg.client_grad == "summed" and self.chunk > 1

    def num_steps(self, data: ClientData) -> int:
        return -(-data.index.shape[1] // self.b)

    def client_keys(self, key, ids):
        return jax.vmap(jax.random.fold_in, (None, 0))(key, ids)

    def begin_chunk(self, server, store, ids, keys, budget) -> ChunkState:
        alg = self.alg
        persistent = jax.tree.map(lambda p: p[ids], store)
        states = _over_clients(lambda c, p: alg.client_init(server, p), self.chunk)(ids, persistent)
        split = jax.vmap(lambda k: tuple(jax.random.fold_in(k, i) for i in range(3)))(keys)
        zeros = jnp.zeros(ids.shape, jnp.float32)
        return ChunkState(states, persistent, *split, zeros, zeros, budget.astype(jnp.float32))

    def epoch_orders(self, data: ClientData, ids, shuffle_keys, e):
        """Row positions of each step's batch in epoch ``e``: a reshuffle of each client's
        real examples, one uniform per example index (so padding does not move them)."""
        max_n, steps, b = data.index.shape[1], self.num_steps(data), self.b

        def one(c, key):
            n = data.sizes[c]
            ekey = jax.random.fold_in(key, e)
            positions = jnp.arange(max_n)
            r = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(ekey, i)))(positions)
            order = jnp.argsort(jnp.where(positions < n, r, 2.0), stable=True)
            return jnp.pad(order, (0, steps * b - max_n)).reshape(steps, b)

        return jax.vmap(one)(ids, shuffle_keys)

    def step(self, server, cs: ChunkState, data: ClientData, ids, orders, e, s) -> ChunkState:
        """Local step ``s`` of epoch ``e`` for every client of the chunk."""
        alg, b = self.alg, self.b

        def inputs(c, order, step_key, done, budget):
            """Client ``c``'s batch and key for this step, and whether the step counts."""
            n = data.sizes[c]
            rows = data.index[c][order[s]]
            example_mask = ((s * b + jnp.arange(b)) < n).astype(jnp.float32)
            key = jax.random.fold_in(jax.random.fold_in(step_key, e), s)
            active = (s * b < n) & (done < budget)
            return Batch(data.x[rows], data.y[rows], example_mask), key, active

        def keep(active, new_state, state, loss):
            return _where_tree(active, new_state, state), loss * active, active.astype(jnp.float32)

        if self.summed:
            # One gradient of the chunk's summed objective: client k's objective depends only
            # on its own params, so the gradient's slice k is client k's gradient.
            batch, key, active = jax.vmap(inputs)(ids, orders, cs.step_keys, cs.active_steps, cs.budget)
            losses = jax.vmap(functools.partial(alg.client_loss, server))

            def total(params):
                objective, loss = losses(cs.states, params, batch, key)
                return jnp.sum(objective), loss

            (_, loss), grads = jax.value_and_grad(total, has_aux=True)(jax.vmap(alg.client_params)(cs.states))
            new_states = jax.vmap(functools.partial(alg.client_apply, server))(cs.states, grads)
            states, loss, active = jax.vmap(keep)(active, new_states, cs.states, loss)
        else:
            def one(c, state, order, step_key, done, budget):
                batch, key, active = inputs(c, order, step_key, done, budget)
                new_state, loss = alg.client_step(server, state, batch, key)
                return keep(active, new_state, state, loss)

            states, loss, active = _over_clients(one, self.chunk)(ids, cs.states, orders, cs.step_keys,
                                                                  cs.active_steps, cs.budget)
        return cs._replace(states=states, loss_sum=cs.loss_sum + loss, active_steps=cs.active_steps + active)

    def finish(self, server, cs: ChunkState, data: ClientData, ids) -> ClientResult:
        alg = self.alg

        def one(c, state, persistent, key, loss_sum, active_steps):
            result = alg.client_finish(server, state, persistent, data.sizes[c], key)
            return result._replace(metrics=dict(
                result.metrics, train_loss=loss_sum / jnp.maximum(active_steps, 1.0)))

        return _over_clients(one, self.chunk)(ids, cs.states, cs.persistent, cs.finish_keys,
                                              cs.loss_sum, cs.active_steps)

    def empty_accumulator(self, server, store, data: ClientData, ids, keys, budget) -> Accumulator:
        shapes = jax.eval_shape(
            lambda: self.finish(server, self.begin_chunk(server, store, ids, keys, budget), data, ids))
        zeros = lambda s: jnp.zeros(s.shape[1:], s.dtype)  # noqa: E731
        sums = jax.tree.map(zeros, (shapes.contribution, shapes.metrics))
        collected = None
        if self.cfg.collect:
            payload = jax.eval_shape(jax.vmap(self.alg.uplink_payload), shapes.contribution)
            collected = Collected(
                jnp.zeros((self.cfg.collect, payload.shape[-1]), payload.dtype),
                {k: jnp.zeros((self.cfg.collect,), v.dtype) for k, v in shapes.metrics.items()})
        return Accumulator(sums, store, collected)

    def end_chunk(self, server, cs: ChunkState, data: ClientData, ids, valid, slots,
                  acc: Accumulator) -> Accumulator:
        """Adds the chunk's contributions and metrics (weighted by ``valid``), stores its
        persistent states, and keeps the messages of its collected positions."""
        result = self.finish(server, cs, data, ids)
        weighted_sum = lambda a, x: a + jnp.tensordot(valid, x, axes=1)  # noqa: E731
        sums = jax.tree.map(weighted_sum, acc.sums, (result.contribution, result.metrics))
        # Padding clients write nowhere: their id is pushed out of bounds and dropped.
        write_ids = jnp.where(valid > 0, ids, data.index.shape[0])
        store = jax.tree.map(lambda s, p: s.at[write_ids].set(p, mode="drop"), acc.store, result.persistent)
        collected = acc.collected
        if collected is not None:
            payload = jax.vmap(self.alg.uplink_payload)(result.contribution)
            chex.assert_shape(payload, (ids.shape[0], collected.payload.shape[1]))
            put = lambda buf, x: buf.at[slots].set(x, mode="drop")  # noqa: E731
            collected = Collected(put(collected.payload, payload),
                                  {k: put(v, result.metrics[k]) for k, v in collected.metrics.items()})
        return Accumulator(sums, store, collected)

    def end_round(self, server, acc: Accumulator, valid, store_before=None):
        """Combines the sums (over devices when sharded) and applies ``server_update``.
        ``store_before``: the store as the round found it (sharded rounds only)."""
        (contribution, metrics), store, collected = acc
        k = jnp.sum(valid)
        if self.axis is not None:  # each device summed its share of the cohort
            contribution, metrics, k = jax.lax.psum((contribution, metrics, k), self.axis)
            # Persistent states changed only where their client trained: sum the changes.
            store = jax.tree.map(lambda old, new: old + jax.lax.psum(new - old, self.axis),
                                 store_before, store)
            if collected is not None:  # every slot was written on exactly one device
                collected = jax.lax.psum(collected, self.axis)
        # No client reported (all dropped or unavailable): the server keeps its state.
        server = _where_tree(k > 0, self.alg.server_update(server, contribution, k), server)
        means = {name: v / jnp.maximum(k, 1.0) for name, v in metrics.items()}
        return RoundOutput(server, store, dict(means, reported_clients=k), collected)


class Loop:
    """How ``_round_program`` runs its stages and loops (see the module docstring)."""

    def call(self, fn: Callable, *args): ...
    def fori(self, n: int, body: Callable, carry): ...
    def take(self, arrays, index, size: int): ...
    def steps(self, stages: _Stages, data: ClientData, ids) -> int: ...


def _round_program(loop: Loop, st: _Stages, server, store, data: ClientData, cohort: Cohort, key):
    """The round, once: chunks of clients, their epochs and steps, then the server update."""
    chex.assert_equal_shape([cohort.ids, cohort.valid, cohort.collect, cohort.steps])
    chex.assert_rank(cohort.ids, 1)
    check_client_data(data)
    if cohort.ids.shape[0] % st.chunk:
        raise ValueError(f"the cohort ({cohort.ids.shape[0]}) is not padded to a multiple of "
                         f"the client chunk ({st.chunk})")
    keys = loop.call(st.client_keys, key, cohort.ids)
    first = loop.take((cohort.ids, keys, cohort.steps), 0, st.chunk)
    acc = loop.call(st.empty_accumulator, server, store, data, *first)

    def chunk_body(c, acc):
        ids, valid, ks, slots, budget = loop.take(
            (cohort.ids, cohort.valid, keys, cohort.collect, cohort.steps), c, st.chunk)
        cs = loop.call(st.begin_chunk, server, acc.store, ids, ks, budget)
        steps = loop.steps(st, data, ids)

        def epoch_body(e, cs):
            orders = loop.call(st.epoch_orders, data, ids, cs.shuffle_keys, e)
            return loop.fori(steps, lambda s, cs: loop.call(st.step, server, cs, data, ids, orders, e, s), cs)

        cs = loop.fori(st.cfg.local_epochs, epoch_body, cs)
        return loop.call(st.end_chunk, server, cs, data, ids, valid, slots, acc)

    acc = loop.fori(cohort.ids.shape[0] // st.chunk, chunk_body, acc)
    return loop.call(st.end_round, server, acc, cohort.valid, store if st.axis else None)


class _InProgram(Loop):
    """Everything inside one traced program."""

    def call(self, fn, *args):
        return fn(*args)

    def fori(self, n, body, carry):
        return jax.lax.fori_loop(0, n, body, carry)

    def take(self, arrays, index, size):
        return tuple(jax.lax.dynamic_slice_in_dim(a, index * size, size) for a in arrays)

    def steps(self, stages, data, ids):
        return stages.num_steps(data)


class _HostDriven(Loop):
    """Loops in Python, each stage a small jitted program; steps past the largest client of
    a chunk are skipped (they would change nothing)."""

    def __init__(self, jitted: dict[Callable, Callable], sizes: np.ndarray):
        self.jitted, self.sizes = jitted, sizes

    def call(self, fn, *args):
        return self.jitted[fn](*args)

    def fori(self, n, body, carry):
        for i in range(n):
            carry = body(i, carry)
        return carry

    def take(self, arrays, index, size):
        return tuple(a[index * size:(index + 1) * size] for a in arrays)

    def steps(self, stages, data, ids):
        return -(-int(self.sizes[np.asarray(ids)].max()) // stages.b)


class _Compiling(_HostDriven):
    """Walks the host-driven round once on abstract values, compiling every stage it meets:
    one chunk, one epoch and one step stand for all of them (their shapes are the same)."""

    def call(self, fn, *args):
        jitted = self.jitted[fn]
        jitted.lower(*args).compile()
        return jax.eval_shape(jitted, *args)

    def fori(self, n, body, carry):
        return body(0, carry) if n else carry

    def take(self, arrays, index, size):
        return tuple(jax.ShapeDtypeStruct((size, *a.shape[1:]), a.dtype) for a in arrays)

    def steps(self, stages, data, ids):
        return 1


def _devices(num_devices: int) -> list:
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"--num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return devices


def clients_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` devices (0 = all).

    Built from ``Mesh`` directly: ``jax.make_mesh`` gives Explicit axes in JAX 0.10, which
    reject the unsharded (replicated) inputs the round takes.
    """
    return Mesh(np.array(_devices(num_devices)), (CLIENTS_AXIS,))


def runs_mesh(runs: int, num_devices: int = 0) -> Mesh:
    """A 2-D ``runs`` x ``clients`` mesh for ``runs`` runs in one program: as many devices
    on ``runs`` as divide the runs evenly, the rest on ``clients`` (each run's cohort)."""
    devices = _devices(num_devices)
    on_runs = math.gcd(runs, len(devices))
    return Mesh(np.array(devices).reshape(on_runs, len(devices) // on_runs), (RUNS_AXIS, CLIENTS_AXIS))


class RoundFn:
    """``round(server, store, data, cohort, key) -> RoundOutput``; ``compile(...)`` the same
    arguments (or their shapes) ahead of time and returns the seconds it took.

    ``strategy="scan"``: the whole round is one program, sharded over the ``clients`` axis
    of ``mesh`` when it has several devices (each device trains its slice of the cohort, the
    sums are combined with ``psum`` -- DrJAX's map/reduce shape written with
    ``jax.shard_map``). ``strategy="host_loop"``: jitted stages driven from Python, one
    device. Both draw the same random numbers and give the same results.

    ``runs > 1`` (scan only): that many runs of the same shapes in one program, vmapped over
    a leading runs axis of the server state, the store, the cohort, the key and the clients'
    example index and sizes (the examples themselves are shared); with a ``runs_mesh`` the
    runs are sharded over its ``runs`` axis and each run's cohort over ``clients``.
    """

    def __init__(self, alg: FederatedAlgorithm, cfg: EngineConfig, strategy: str = "scan",
                 mesh: Mesh | None = None, runs: int = 1):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        if runs > 1 and strategy != "scan":
            raise ValueError("runs share one program only with the scan strategy")
        sharded = strategy == "scan" and mesh is not None and mesh.size > 1
        self.strategy, self.cfg, self.runs = strategy, cfg, runs
        self.devices = mesh.size if sharded else 1
        self.client_devices = mesh.shape[CLIENTS_AXIS] if sharded else 1  # a cohort's devices
        stages = _Stages(alg, cfg, CLIENTS_AXIS if self.client_devices > 1 else None)
        jit = functools.partial(jax.jit, compiler_options=compiler_options(cfg))
        if strategy == "scan":
            program = functools.partial(_round_program, _InProgram(), stages)
            if runs > 1:
                program = _over_runs(program, runs, cfg.runs_vectorized)
            if sharded:
                batch = (RUNS_AXIS,) if runs > 1 else ()
                per_run, rep = PartitionSpec(*batch), PartitionSpec()
                split = PartitionSpec(*batch, CLIENTS_AXIS)
                data_spec = ClientData(rep, rep, per_run, per_run)
                # check_vma=False: the mask's custom VJP returns theta * g, a cotangent that
                # varies over devices for a theta that does not, which the type check rejects.
                program = jax.shard_map(program, mesh=mesh,
                                        in_specs=(per_run, per_run, data_spec, Cohort(split, split, split, split), per_run),
                                        out_specs=per_run, check_vma=False)
            self._program = jit(program, donate_argnums=(0, 1))
        else:
            donate = {stages.step: (1,), stages.end_chunk: (6,)}
            self._stages = {fn: jit(fn, donate_argnums=donate.get(fn, ()))
                            for fn in (stages.client_keys, stages.empty_accumulator, stages.begin_chunk,
                                       stages.epoch_orders, stages.step, stages.end_chunk, stages.end_round)}
            self._program = stages
        self._compiled = None

    def compile(self, server, store, data, cohort: Cohort, key) -> float:
        t0 = time.perf_counter()
        if self.strategy == "scan":
            self._compiled = self._program.lower(server, store, data, cohort, key).compile()
        else:
            abstract = jax.tree.map(
                lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                (server, store, data, cohort, key))
            _round_program(_Compiling(self._stages, np.zeros(0)), self._program, *abstract)
        return time.perf_counter() - t0

    def __call__(self, server, store, data, cohort: Cohort, key) -> RoundOutput:
        if self.strategy == "scan":
            return (self._compiled or self._program)(server, store, data, cohort, key)
        loop = _HostDriven(self._stages, np.asarray(data.sizes))
        ids = np.asarray(cohort.ids)  # host copy: the chunk's step count is read from it
        return _round_program(loop, self._program, server, store, data, cohort._replace(ids=ids), key)


def _over_runs(program, runs: int, vectorized: int):
    """``program`` over a leading runs axis: vmapped, or ``vectorized`` runs vmapped at a time
    and those groups one after another (``lax.map``), so that a group's working set is the
    one a single run keeps in cache."""
    if not vectorized or vectorized >= runs:
        return jax.vmap(program, in_axes=(0, 0, ClientData(None, None, 0, 0), 0, 0))

    def one_after_another(server, store, data, cohort, key):
        def one(xs):
            server, store, index, sizes, cohort, key = xs
            return program(server, store, data._replace(index=index, sizes=sizes), cohort, key)
        return jax.lax.map(one, (server, store, data.index, data.sizes, cohort, key),
                           batch_size=vectorized if vectorized > 1 else None)
    return one_after_another


def make_round_fn(alg: FederatedAlgorithm, cfg: EngineConfig, strategy: str = "scan",
                  mesh: Mesh | None = None, runs: int = 1) -> RoundFn:
    """See ``RoundFn``."""
    return RoundFn(alg, cfg, strategy, mesh, runs)


def make_eval_fn(alg: FederatedAlgorithm, eval_batch_size: int,
                 options: dict[str, str] | None = None, runs: int = 1, runs_vectorized: int = 0):
    """Returns ``evaluate(server, x, y, key) -> {metric: mean over examples}``.

    ``options``: XLA compiler options, e.g. ``compiler_options(cfg)``. ``runs > 1``: ``server``
    and ``key`` have a leading runs axis, the metrics too (the test set is shared);
    ``runs_vectorized`` of them are vmapped at a time (0 = all).

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

    if runs > 1 and (not runs_vectorized or runs_vectorized >= runs):
        eval_fn = jax.vmap(eval_fn, in_axes=(0, None, None, 0))
    elif runs > 1:
        one_run = eval_fn

        def eval_fn(server, x, y, key):
            return jax.lax.map(lambda sk: one_run(sk[0], x, y, sk[1]), (server, key),
                               batch_size=runs_vectorized if runs_vectorized > 1 else None)
    return jax.jit(eval_fn, compiler_options=options)


def init_store(alg: FederatedAlgorithm, num_clients: int) -> PyTree:
    """Every client's persistent state, stacked on a leading client axis."""
    one = alg.persistent_init()
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients, *p.shape)).copy(), one)


def auto_strategy(*, conv: bool, backend: str) -> str:
    """The whole round in one program, except conv models on XLA:CPU (see RoundFn)."""
    return "host_loop" if (backend == "cpu" and conv) else "scan"


def auto_client_grad(*, conv: bool, chunk: int, backend: str) -> str:
    """How a vmapped chunk's gradients are taken (``EngineConfig.client_grad``).

    ``summed`` for conv models in chunks of several clients on GPU: their per-client
    convolutions are grouped convolutions, and the summed objective's filter gradient is a
    ``batch_group_count`` convolution on the activations as they are, which XLA maps to
    cuDNN's grouped backward-filter kernel, where each client's vmapped gradient is a
    forward convolution over transposed copies of them. ``per_client`` everywhere else: MLP
    results stay as they were; XLA:CPU runs the ``batch_group_count`` form several times
    slower than the vmapped one (``python -m experiments.bench_conv --clients=4 --batch=8``,
    two runs on a shared 2-core host: 0.6-3.0 s against 0.06-0.4 s a step per Conv4 layer),
    and on TPU it is not measured yet.
    """
    return "summed" if conv and chunk > 1 and backend == "gpu" else "per_client"


def cpu_cache_bytes(default: int = 32 * 2**20) -> int:
    """The last-level cache of this host (L3 from sysconf, else L2), or ``default``."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size and size > 0:
            return int(size)
    return default


def auto_runs_per_program(runs: int, num_params: int, chunk: int, *, backend: str,
                          memory_budget_bytes: float | None = None) -> int:
    """How many runs to vmap together: each holds a chunk of clients' working set (as in
    ``auto_chunk_size``), as many as fit the device memory budget of client chunks (8 GB; on
    CPU at most a quarter of the host's memory)."""
    if memory_budget_bytes is None:
        memory_budget_bytes = 8e9
        if backend == "cpu":
            memory_budget_bytes = min(memory_budget_bytes, host_memory_bytes() / 4)
    per_run = 8 * 4 * num_params * chunk
    return int(max(1, min(runs, memory_budget_bytes // per_run)))


def auto_runs_vectorized(runs: int, num_params: int, chunk: int, *, backend: str) -> int:
    """Of ``runs`` runs in one program, how many to vmap together: all on accelerators (the
    program is sized by ``auto_runs_per_program``); on CPU as many as keep their chunks'
    working set in the last-level cache -- as for chunks, a vmap that spills it is slower per
    run than runs one after another inside the program (docs/benchmarks.md)."""
    if backend != "cpu":
        return runs
    return int(max(1, min(runs, cpu_cache_bytes() // (8 * 4 * num_params * chunk))))


def host_memory_bytes(default: int = 8 * 2**30) -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return default


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def message_bytes(alg: FederatedAlgorithm) -> int:
    """Bytes of one client's collected message (``uplink_payload``), from shapes alone."""
    if alg.uplink_payload is None:
        return 0
    server = jax.eval_shape(alg.server_init, jax.random.key(0))
    persistent = jax.eval_shape(alg.persistent_init)

    def payload(server, persistent, key):
        state = alg.client_init(server, persistent)
        return alg.uplink_payload(alg.client_finish(server, state, persistent, jnp.int32(1), key).contribution)

    return _tree_bytes(jax.eval_shape(payload, server, persistent, jax.random.key(0)))


def memory_needed(alg: FederatedAlgorithm, cfg: EngineConfig, *, num_clients: int, index_width: int,
                  runs: int = 1, runs_per_device: int | None = None) -> dict[str, int]:
    """What a run's arrays take on its device, in bytes, from shapes alone (nothing is
    allocated), by what sets their size: the client index (every client's row padded to the
    widest client), every client's persistent state, a vmapped chunk's working set (as
    ``auto_chunk_size`` counts it) and the messages collected per round. ``runs`` runs in one
    program, ``runs_per_device`` of them on each device (default: all)."""
    per_device = runs if runs_per_device is None else runs_per_device
    vectorized = min(cfg.runs_vectorized or per_device, per_device)
    return {
        "client index": per_device * num_clients * index_width * 4,
        "persistent client states": per_device * num_clients * _tree_bytes(jax.eval_shape(alg.persistent_init)),
        "client chunk": vectorized * cfg.client_chunk_size * 8 * 4 * alg.num_params,
        "collected messages": per_device * cfg.collect * message_bytes(alg),
    }


def device_memory_bytes(backend: str | None = None) -> int | None:
    """Memory of one device: the host's on CPU, the allocator's limit on accelerators (None
    when the device does not say)."""
    if (backend or jax.default_backend()) == "cpu":
        return host_memory_bytes()
    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def auto_chunk_size(cohort_size: int, num_params: int, *, conv: bool, backend: str,
                    memory_budget_bytes: float | None = None) -> int:
    """How many clients to vmap together, chosen per backend.

    On XLA:CPU a vmapped convolution becomes a grouped convolution whose gradient runs ~35x
    slower than a plain one, so conv clients run one at a time there. Everywhere else clients
    are vmapped, as many as fit a memory budget (scores, optimizer state, gradients and
    masks: ~8 copies of the parameters per client), preferring a divisor of the cohort so no
    padding clients are trained. On CPU the budget is the last-level cache, with at least two
    clients (a chunk whose working set stays in cache trains fastest; docs/benchmarks.md);
    on GPU/TPU it is 8 GB of device memory.
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
