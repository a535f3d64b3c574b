"""The round program: one round trains a whole cohort and aggregates it.

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

import functools
import time
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fedmask_jax.algorithms.base import Batch, ClientResult, FederatedAlgorithm, PyTree
from fedmask_jax.engine.cohort import Cohort
from fedmask_jax.engine.config import CLIENT_GRADS, STRATEGIES, EngineConfig, compiler_options
from fedmask_jax.engine.data import ClientData, check_client_data
from fedmask_jax.engine.placement import CLIENTS_AXIS, RUNS_AXIS


class Collected(NamedTuple):
    """The messages of the collected cohort positions, in slot order."""

    payload: jax.Array  # [slots, payload bytes] uint8: alg.uplink_payload of the contribution
    metrics: dict[str, jax.Array]  # [slots] each: that client's own metrics


# The round's own metrics, beside the client means: how many reported and what each client
# downloaded. A round no client reported in has these and no means.
ROUND_METRICS = ("reported_clients", "downlink_bpp")


class RoundOutput(NamedTuple):
    server: PyTree
    store: PyTree  # every client's persistent state (leading client axis)
    metrics: dict[str, jax.Array]  # means over the cohort's real clients, and ROUND_METRICS
    collected: Collected | None  # None when the round collects no messages
    # [cohort positions] each: the metrics named in EngineConfig.per_client, client by client
    # (0 where a position does not report); None when it names none.
    per_client: dict[str, jax.Array] | None = None
    # A round that stores its clients' contributions (``Contributions``) instead of updating
    # the server: the store it was given, with theirs written in; None otherwise.
    contributions: "Contributions | None" = None


class Contributions(NamedTuple):
    """Clients' contributions kept between rounds (buffered aggregation's slots): a round that
    is given them trains its cohort, writes each reporting position's contribution at its slot
    and leaves the server as it was; ``aggregate`` applies a weighted sum of them later."""

    values: PyTree  # [slots, ...] each leaf: a contribution's leaf
    slots: jax.Array  # [cohort positions] int32: each position's slot (>= slots: none)


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
    """What the chunks add up to: contribution and metric sums, the store, collected messages
    and the per-client metrics."""

    sums: tuple[PyTree, dict[str, jax.Array]]
    store: PyTree
    collected: Collected | None
    per_client: dict[str, jax.Array] | None


class _Stages:
    """The round's stages as pure functions over a chunk of clients; ``_round_program``
    strings them together and a ``Loop`` decides how each is run."""

    def __init__(self, alg: FederatedAlgorithm, cfg: EngineConfig, axis: str | None, devices: int = 1):
        if cfg.collect and alg.uplink_payload is None:
            raise ValueError(f"{alg.name} has no uplink_payload to collect")
        if cfg.client_grad not in CLIENT_GRADS:
            raise ValueError(f"unknown client_grad {cfg.client_grad!r}; expected one of {CLIENT_GRADS}")
        if cfg.client_grad == "summed" and not alg.separable_step:
            raise ValueError(f"client_grad='summed' needs {alg.name}'s step as client_params, "
                             "client_loss and client_apply")
        self.alg, self.cfg, self.axis, self.devices = alg, cfg, axis, devices
        self.stores = cfg.store_contributions
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

    def empty_accumulator(self, server, store, data: ClientData, ids, keys, budget, positions,
                          kept=None) -> Accumulator:
        """``positions``: this device's cohort positions (its size fixes the per-client buffers');
        ``kept``: the stored contributions a storing round writes into (``Contributions.values``)."""
        shapes = jax.eval_shape(
            lambda: self.finish(server, self.begin_chunk(server, store, ids, keys, budget), data, ids))
        zeros = lambda s: jnp.zeros(s.shape[1:], s.dtype)  # noqa: E731
        sums = jax.tree.map(zeros, (shapes.contribution, shapes.metrics))
        if self.stores:
            sums = (kept, sums[1])
        collected = None
        if self.cfg.collect:
            payload = jax.eval_shape(jax.vmap(self.alg.uplink_payload), shapes.contribution)
            collected = Collected(
                jnp.zeros((self.cfg.collect, payload.shape[-1]), payload.dtype),
                {k: jnp.zeros((self.cfg.collect,), v.dtype) for k, v in shapes.metrics.items()})
        per_client = None
        if self.cfg.per_client:  # a name the method does not report is left out
            size = positions.shape[0] * self.devices
            per_client = {k: jnp.zeros((size,), shapes.metrics[k].dtype)
                          for k in self.cfg.per_client if k in shapes.metrics} or None
        return Accumulator(sums, store, collected, per_client)

    def end_chunk(self, server, cs: ChunkState, data: ClientData, ids, valid, slots, positions, dests,
                  acc: Accumulator) -> Accumulator:
        """Adds the chunk's contributions and metrics (weighted by ``valid``) -- or, in a
        storing round, writes each reporting client's contribution at its slot (``dests``) --,
        stores its persistent states, keeps the messages of its collected positions and writes
        the per-client metrics at its ``positions`` (this device's)."""
        result = self.finish(server, cs, data, ids)
        weighted_sum = lambda a, x: a + jnp.tensordot(valid, x, axes=1)  # noqa: E731
        if self.stores:
            kept = acc.sums[0]
            to = jnp.where(valid > 0, dests, jax.tree.leaves(kept)[0].shape[0])  # others write nowhere
            kept = jax.tree.map(lambda k, x: k.at[to].set(x, mode="drop"), kept, result.contribution)
            sums = (kept, jax.tree.map(weighted_sum, acc.sums[1], result.metrics))
        else:
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
        per_client = acc.per_client
        if per_client is not None:
            if self.axis is not None:  # this device's slice of the cohort comes after the ones before it
                local = next(iter(per_client.values())).shape[0] // self.devices
                positions = positions + jax.lax.axis_index(self.axis) * local
            per_client = {k: v.at[positions].set(jnp.where(valid > 0, result.metrics[k], 0))
                          for k, v in per_client.items()}
        return Accumulator(sums, store, collected, per_client)

    def end_round(self, server, acc: Accumulator, valid, store_before=None, kept_before=None, dests=None):
        """Combines the sums (over devices when sharded) and applies ``server_update`` -- or,
        in a storing round, hands back the stored contributions with the server as it was.
        ``store_before``/``kept_before``: the store and the stored contributions as the round
        found them, ``dests`` this device's positions' slots (sharded rounds only)."""
        (contribution, metrics), store, collected, per_client = acc
        k = jnp.sum(valid)
        changed = lambda old, new: old + jax.lax.psum(new - old, self.axis)  # noqa: E731
        if self.axis is not None:  # each device summed its share of the cohort
            metrics, k = jax.lax.psum((metrics, k), self.axis)
            if self.stores:  # each slot was written on one device at most: take that device's value
                slots = jax.tree.leaves(contribution)[0].shape[0]
                mine = jnp.zeros(slots, jnp.int32).at[jnp.where(valid > 0, dests, slots)].set(1, mode="drop")
                anyone = jax.lax.psum(mine, self.axis)

                def merged(old, new):
                    shape = (slots,) + (1,) * (new.ndim - 1)
                    theirs = jax.lax.psum(jnp.where(mine.reshape(shape) > 0, new, 0), self.axis)
                    return jnp.where(anyone.reshape(shape) > 0, theirs, old)
                contribution = jax.tree.map(merged, kept_before, contribution)
            else:
                contribution = jax.lax.psum(contribution, self.axis)
            # Persistent states changed only where their client trained: sum the changes.
            store = jax.tree.map(changed, store_before, store)
            if collected is not None:  # every slot was written on exactly one device
                collected = jax.lax.psum(collected, self.axis)
            if per_client is not None:  # as was every position
                per_client = jax.lax.psum(per_client, self.axis)
        means = {name: v / jnp.maximum(k, 1.0) for name, v in metrics.items()}
        if self.alg.downlink_bits is not None:  # what the round's clients downloaded: the server's
            means["downlink_bpp"] = self.alg.downlink_bits(server) / self.alg.num_params
        if self.stores:
            return RoundOutput(server, store, dict(means, reported_clients=k), collected, per_client, contribution)
        # No client reported (all dropped or unavailable): the server keeps its state.
        server = _where_tree(k > 0, self.alg.server_update(server, contribution, k), server)
        return RoundOutput(server, store, dict(means, reported_clients=k), collected, per_client)

    def aggregate(self, server, kept, weights, count):
        """``server_update`` with the ``weights``-weighted sum of the stored contributions and
        ``count`` as the number of clients, summed chunk by chunk in slot order as a round sums
        its cohort (so that weights of 1 on a cohort's slots, and their number, give that
        round's server bit for bit)."""
        chunk = self.chunk
        zero = jax.tree.map(lambda v: jnp.zeros(v.shape[1:], v.dtype), kept)

        def body(c, total):
            w = jax.lax.dynamic_slice_in_dim(weights, c * chunk, chunk)
            return jax.tree.map(lambda a, v: a + jnp.tensordot(w, jax.lax.dynamic_slice_in_dim(v, c * chunk, chunk),
                                                               axes=1), total, kept)

        total = jax.lax.fori_loop(0, weights.shape[0] // chunk, body, zero)
        return _where_tree(count > 0, self.alg.server_update(server, total, count), server)


class Loop:
    """How ``_round_program`` runs its stages and loops (see the module docstring)."""

    def call(self, fn: Callable, *args): ...
    def fori(self, n: int, body: Callable, carry): ...
    def take(self, arrays, index, size: int): ...
    def steps(self, stages: _Stages, data: ClientData, ids) -> int: ...


def _round_program(loop: Loop, st: _Stages, server, store, data: ClientData, cohort: Cohort, key,
                   kept: Contributions | None = None):
    """The round, once: chunks of clients, their epochs and steps, then the server update (a
    storing round: the contributions written into ``kept``'s slots instead)."""
    chex.assert_equal_shape([cohort.ids, cohort.valid, cohort.collect, cohort.steps])
    chex.assert_rank(cohort.ids, 1)
    check_client_data(data)
    if cohort.ids.shape[0] % st.chunk:
        raise ValueError(f"the cohort ({cohort.ids.shape[0]}) is not padded to a multiple of "
                         f"the client chunk ({st.chunk})")
    keys = loop.call(st.client_keys, key, cohort.ids)
    positions = np.arange(cohort.ids.shape[0], dtype=np.int32)  # this device's share of the cohort
    if st.stores != (kept is not None):
        raise ValueError("a round stores contributions exactly when EngineConfig.store_contributions is set")
    dests = kept.slots if kept is not None else positions
    first = loop.take((cohort.ids, keys, cohort.steps), 0, st.chunk)
    acc = loop.call(st.empty_accumulator, server, store, data, *first, positions,
                    kept.values if kept is not None else None)

    def chunk_body(c, acc):
        ids, valid, ks, slots, budget, places, to = loop.take(
            (cohort.ids, cohort.valid, keys, cohort.collect, cohort.steps, positions, dests), c, st.chunk)
        cs = loop.call(st.begin_chunk, server, acc.store, ids, ks, budget)
        steps = loop.steps(st, data, ids)

        def epoch_body(e, cs):
            orders = loop.call(st.epoch_orders, data, ids, cs.shuffle_keys, e)
            return loop.fori(steps, lambda s, cs: loop.call(st.step, server, cs, data, ids, orders, e, s), cs)

        cs = loop.fori(st.cfg.local_epochs, epoch_body, cs)
        return loop.call(st.end_chunk, server, cs, data, ids, valid, slots, places, to, acc)

    acc = loop.fori(cohort.ids.shape[0] // st.chunk, chunk_body, acc)
    sharded_kept = st.axis is not None and kept is not None
    return loop.call(st.end_round, server, acc, cohort.valid, store if st.axis else None,
                     kept.values if sharded_kept else None, kept.slots if sharded_kept else None)


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
        stages = _Stages(alg, cfg, CLIENTS_AXIS if self.client_devices > 1 else None, self.client_devices)
        jit = functools.partial(jax.jit, compiler_options=compiler_options(cfg))
        stores = cfg.store_contributions
        if strategy == "scan":
            program = functools.partial(_round_program, _InProgram(), stages)
            if runs > 1:
                program = _over_runs(program, runs, cfg.runs_vectorized, stores)
            if sharded:
                batch = (RUNS_AXIS,) if runs > 1 else ()
                per_run, rep = PartitionSpec(*batch), PartitionSpec()
                split = PartitionSpec(*batch, CLIENTS_AXIS)
                data_spec = ClientData(rep, rep, per_run, per_run)
                kept_spec = (Contributions(per_run, split),) if stores else ()
                # check_vma=False: the mask's custom VJP returns theta * g, a cotangent that
                # varies over devices for a theta that does not, which the type check rejects.
                program = jax.shard_map(program, mesh=mesh,
                                        in_specs=(per_run, per_run, data_spec, Cohort(split, split, split, split),
                                                  per_run, *kept_spec),
                                        out_specs=per_run, check_vma=False)
            if stores:  # the slots' contributions are written in place; their positions are read
                storing = program
                program = lambda server, store, data, cohort, key, values, slots: storing(  # noqa: E731
                    server, store, data, cohort, key, Contributions(values, slots))
            self._program = jit(program, donate_argnums=(0, 1, 5) if stores else (0, 1))
        else:
            donate = {stages.step: (1,), stages.end_chunk: (8,)}
            self._stages = {fn: jit(fn, donate_argnums=donate.get(fn, ()))
                            for fn in (stages.client_keys, stages.empty_accumulator, stages.begin_chunk,
                                       stages.epoch_orders, stages.step, stages.end_chunk, stages.end_round)}
            self._program = stages
        self._compiled = None
        self._aggregate = self._aggregate_compiled = None
        if stores:
            aggregate = jax.vmap(stages.aggregate) if runs > 1 else stages.aggregate
            self._aggregate = jit(aggregate, donate_argnums=(0,))

    @property
    def compiled(self):
        """The scan strategy's one program once ``compile`` made it (``jax.stages.Compiled``:
        its HLO text, its cost); None before, and for the host loop's many small programs."""
        return self._compiled if self.strategy == "scan" else None

    def compile(self, server, store, data, cohort: Cohort, key, kept: Contributions | None = None) -> float:
        t0 = time.perf_counter()
        extra = (kept,) if kept is not None else ()
        if self.strategy == "scan":
            self._compiled = self._program.lower(server, store, data, cohort, key, *(kept or ())).compile()
        else:
            abstract = jax.tree.map(
                lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                (server, store, data, cohort, key, *extra))
            _round_program(_Compiling(self._stages, np.zeros(0)), self._program, *abstract)
        if kept is not None:
            slots = jax.tree.leaves(kept.values)[0].shape[:2 if self.runs > 1 else 1]
            self._aggregate_compiled = self._aggregate.lower(
                server, kept.values, jax.ShapeDtypeStruct(slots, jnp.float32),
                jax.ShapeDtypeStruct(slots[:-1], jnp.float32)).compile()
        return time.perf_counter() - t0

    def __call__(self, server, store, data, cohort: Cohort, key, kept: Contributions | None = None) -> RoundOutput:
        """A round over ``cohort``; with ``kept`` (a storing round: ``EngineConfig.store_contributions``)
        its contributions go into their slots and the server is handed back as it was."""
        if self.strategy == "scan":
            return (self._compiled or self._program)(server, store, data, cohort, key, *(kept or ()))
        extra = (kept,) if kept is not None else ()
        loop = _HostDriven(self._stages, np.asarray(data.sizes))
        ids = np.asarray(cohort.ids)  # host copy: the chunk's step count is read from it
        return _round_program(loop, self._program, server, store, data, cohort._replace(ids=ids), key, *extra)

    def aggregate(self, server, values, weights, count) -> PyTree:
        """The server updated with the ``weights``-weighted sum of stored contributions
        (``[slots]`` weights, a multiple of the client chunk) as ``count`` clients' (a leading
        runs axis on all of them with ``runs > 1``)."""
        return (self._aggregate_compiled or self._aggregate)(server, values, weights, count)


def _over_runs(program, runs: int, vectorized: int, stores: bool = False):
    """``program`` over a leading runs axis: vmapped, or ``vectorized`` runs vmapped at a time
    and those groups one after another (``lax.map``), so that a group's working set is the
    one a single run keeps in cache. ``stores``: it takes the runs' stored contributions too."""
    if not vectorized or vectorized >= runs:
        return jax.vmap(program, in_axes=(0, 0, ClientData(None, None, 0, 0), 0, 0, *((0,) if stores else ())))

    def one_after_another(server, store, data, cohort, key, *kept):
        def one(xs):
            server, store, index, sizes, cohort, key, *kept = xs
            return program(server, store, data._replace(index=index, sizes=sizes), cohort, key, *kept)
        return jax.lax.map(one, (server, store, data.index, data.sizes, cohort, key, *kept),
                           batch_size=vectorized if vectorized > 1 else None)
    return one_after_another


def make_round_fn(alg: FederatedAlgorithm, cfg: EngineConfig, strategy: str = "scan",
                  mesh: Mesh | None = None, runs: int = 1) -> RoundFn:
    """See ``RoundFn``."""
    return RoundFn(alg, cfg, strategy, mesh, runs)
