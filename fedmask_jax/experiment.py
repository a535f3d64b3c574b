"""Build: settings become everything a run needs, and nothing is written anywhere.

``build(cfg)`` loads and splits the data, builds the model and the method, takes the
execution strategy and client chunk from ``engine.plan_execution``, makes the round and
evaluation functions and the method's host hooks. ``build([cfg, ...])`` does the same for
several runs that share every shape (``shape_key``): one compiled program trains them all,
vmapped over a leading runs axis, each with its own seed, data split, initial state, cohorts,
keys and the hyperparameters its method reads as values. ``experiments.run`` (through
``simulation.run``), the benchmark and the sweep all start from it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedmask_jax import buffered as buffered_lib
from fedmask_jax import config as config_lib
from fedmask_jax import conv, distributed, engine, federation, keys, models
from fedmask_jax.algorithms import registry
from fedmask_jax.algorithms.base import FederatedAlgorithm, HostContext, HostHook, MethodSpec, PyTree
from fedmask_jax.data import Dataset, holdout_validation, load_dataset, partition
from fedmask_jax.run_config import RunConfig

# Run settings that may differ between runs of one program: they shape only the data split
# or the initial state (the methods' own such settings are marked ``vary=True``).
RUN_VARYING = ("seed", "split", "classes_per_client", "dirichlet_alpha", "max_examples_per_client",
               "availability", "local_work", "round_deadline", "straggler_policy", "uplink_mbps",
               "downlink_mbps", "latency_s", "staleness")
# Settings that say where and how results are written, not what is computed.
OUTPUT_ONLY = ("workdir", "verbose", "tensorboard", "plots", "checkpoint_every", "resume",
               "allow_config_change", "data_dir", "archive_dir", "download")


def shape_key(cfg: RunConfig) -> tuple:
    """Runs with equal keys can share one compiled program (see ``build``)."""
    spec = registry.spec(cfg.algorithm)
    method = dataclasses.asdict(cfg.method_config)
    fixed_method = tuple(sorted((k, v) for k, v in method.items() if k not in config_lib.varying(spec.config)))
    run = dataclasses.asdict(cfg)
    # A validation split is drawn by seed out of the training set: runs then differ in data.
    skip = set(OUTPUT_ONLY) | {"method"} | (set(RUN_VARYING) - ({"seed"} if cfg.validation_fraction else set()))
    fixed_run = tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in run.items() if k not in skip))
    return fixed_run + fixed_method


@dataclasses.dataclass(frozen=True)
class RunsAxis:
    """How a program holds its runs: several on a leading runs axis, one run without it. A
    single run keeps the program it has always had: the host-driven round (conv models on
    CPU) runs stages from Python that do not carry a runs axis, and a single run's
    checkpoints on disk hold its state without one, so ``--resume`` keeps working. Every place
    that builds or reads a program's pytrees goes through here."""

    size: int

    def stack(self, trees: Sequence[PyTree], xp=jnp) -> PyTree:
        """The runs' trees as one (``xp``: ``np`` to keep host arrays on the host)."""
        if self.size == 1:
            return trees[0]
        return jax.tree.map(lambda *xs: xp.stack(xs), *trees)

    def part(self, tree: PyTree, i: int) -> PyTree:
        return tree if self.size == 1 else jax.tree.map(lambda a: a[i], tree)

    def spec(self, *rest) -> PartitionSpec:
        return PartitionSpec(*rest) if self.size == 1 else PartitionSpec(engine.RUNS_AXIS, *rest)

    def mesh(self, num_devices: int, strategy: str) -> Mesh:
        if self.size > 1:
            return engine.runs_mesh(self.size, num_devices)
        # the host loop drives one device; the scanned round shards clients over the mesh
        return engine.clients_mesh(num_devices if strategy == "scan" else 1)


class Buffer(NamedTuple):
    """Buffered aggregation's slots between rounds: their contributions (on the device) and
    their schedule (on the host), both on the runs axis."""

    values: PyTree
    schedule: buffered_lib.Schedule


@dataclasses.dataclass
class Run:
    """One run of a program: its settings and what they alone decide."""

    cfg: RunConfig
    method_config: Any
    partition: list[np.ndarray]  # each client's example indices
    algorithm: FederatedAlgorithm  # this run's values (its initial state); the program traces run 0's
    federation: federation.Federation  # its clients' availability and work
    hooks: Sequence[HostHook]


@dataclasses.dataclass
class Experiment:
    runs: list[Run]  # they share every shape (``shape_key``): one program trains them all
    spec: MethodSpec
    dataset: Dataset
    architecture: models.Architecture
    engine_config: engine.EngineConfig
    strategy: str
    mesh: Mesh
    round_fn: engine.RoundFn
    eval_fn: Any
    data: engine.ClientData  # the runs' example index and sizes on the runs axis
    x_test: jax.Array
    y_test: jax.Array

    @property
    def axis(self) -> RunsAxis:
        return RunsAxis(len(self.runs))

    @property
    def num_params(self) -> int:
        """Entries of a client's working set, the same in every run."""
        return self.runs[0].algorithm.num_params

    def _place(self, tree, spec: PartitionSpec):
        if self.mesh.size > 1:
            return distributed.put(tree, NamedSharding(self.mesh, spec))
        return tree

    def initial_state(self) -> tuple[PyTree, PyTree]:
        """(server state, every client's persistent state) before round 1, on the runs axis."""
        servers = [r.algorithm.server_init(keys.server_key(r.cfg.seed)) for r in self.runs]
        program = self.runs[0].algorithm  # the store has the traced program's shapes
        stores = [engine.init_store(program, r.cfg.num_clients) for r in self.runs]
        return self._place((self.axis.stack(servers), self.axis.stack(stores)), self.axis.spec())

    def cohort(self, round_index: int) -> engine.Cohort:
        return self.round_plan(round_index)[0]

    @property
    def buffered(self) -> bool:
        return self.runs[0].cfg.aggregation == "buffered"

    def initial_buffer(self, server) -> "Buffer | None":
        """Buffered aggregation's slots before round 1 (empty), on the runs axis; None for
        synchronous runs."""
        if not self.buffered:
            return None
        cfg = self.runs[0].cfg
        padded = -(-cfg.slots // self.engine_config.client_chunk_size) * self.engine_config.client_chunk_size
        values = engine.init_contributions(self.runs[0].algorithm, self.axis.part(server, 0), padded)
        values = self.axis.stack([values] * len(self.runs))
        schedule = self.axis.stack([buffered_lib.empty_schedule(cfg.slots, padded)] * len(self.runs), xp=np)
        return Buffer(self._place(values, self.axis.spec()), schedule)

    def round_plan(self, round_index: int, buffer: "Buffer | None" = None) -> tuple[engine.Cohort, list]:
        """The round's cohort (every run's) and each run's plan: its clients, their work and
        the record fields saying how many were available, sampled, dropped or partial (when
        those settings are on); buffered: the refills of the slots the last update freed."""
        if buffer is not None:
            return self._refills(round_index, buffer)
        plans = [r.federation.plan(round_index) for r in self.runs]
        # clients_per_round is part of the shape key: every run's cohort has the same size.
        return self._cohort(plans, round_index, self.runs[0].cfg.clients_per_round), plans

    def _cohort(self, plans, round_index: int, size: int) -> engine.Cohort:
        """The runs' plans as one cohort of at least ``size`` positions, placed on the devices."""
        multiple = self.engine_config.client_chunk_size * self.round_fn.client_devices
        cohort = self.axis.stack([
            engine.make_cohort(p.clients, multiple, self.engine_config.collect, r.cfg.seed, round_index,
                               steps=p.steps, valid=p.valid, size=size)
            for p, r in zip(plans, self.runs)], xp=np)
        split = (engine.CLIENTS_AXIS,) if self.round_fn.client_devices > 1 else ()
        return self._place(cohort, self.axis.spec(*split))

    def _kept(self, buffer: "Buffer", plans, width: int) -> engine.Contributions:
        """The slots' contributions with each cohort position's slot (past the last: none)."""
        slots = []
        for p in plans:
            row = np.full(width, len(buffer.schedule.ids.reshape(-1)), np.int32)  # out of range
            row[:len(p.slots)] = p.slots
            slots.append(row)
        split = (engine.CLIENTS_AXIS,) if self.round_fn.client_devices > 1 else ()
        return engine.Contributions(buffer.values, self._place(self.axis.stack(slots, xp=np), self.axis.spec(*split)))

    def _refills(self, round_index: int, buffer: "Buffer", planned=None, extra: int | None = None):
        """Each run's refills of round ``round_index``: its own (the last M free slots) or,
        given the round's ``planned`` ones, its ``extra``-th batch of up to M more free slots;
        clients sampled among those neither in flight nor planned."""
        m = self.runs[0].cfg.buffered_clients
        plans = []
        for i, run in enumerate(self.runs):
            s = self.axis.part(buffer.schedule, i)
            free = np.flatnonzero(s.free)
            busy = buffered_lib.in_flight(s)
            if planned is None:
                slots = free[-m:]
            else:
                slots = np.setdiff1d(free, planned[i].slots)[:m]
                busy = np.concatenate([busy, planned[i].clients])
            clients = run.federation.refill(round_index, len(slots), busy, extra)
            plans.append(buffered_lib.Refill(clients, None, None, {}, slots[:len(clients)]))
        return self._cohort(plans, round_index, m), plans

    def _store(self, server, store, buffer: "Buffer", cohort, plans, key):
        """One storing round: the refills train from ``server``, their contributions go into
        their slots and the schedule says when each finishes."""
        width = int(np.shape(cohort.ids)[-1])
        out = self.round_fn(server, store, self.data, cohort, key, self._kept(buffer, plans, width))
        metrics, per_client = self.metrics(out), jax.device_get(out.per_client)
        n, schedules = self.num_params, []
        for i, (run, plan) in enumerate(zip(self.runs, plans)):
            part = self.axis.part(per_client, i)
            bits = n * np.asarray(part[self.uplink_metric if self.uplink_metric in part else "uplink_bpp"], np.float64)
            k = len(plan.clients)
            seconds = run.federation.seconds(plan.clients, bits[:k], n * metrics[i].get("downlink_bpp", 0.0))
            schedules.append(buffered_lib.dispatched(self.axis.part(buffer.schedule, i), plan.slots, plan.clients,
                                                     seconds))
        return out, Buffer(out.contributions, self.axis.stack(schedules, xp=np))

    def _buffered_round(self, server, store, cohort, round_index: int, buffer: "Buffer", plans):
        """Round ``round_index`` of buffered aggregation (``fedmask_jax.buffered``): free slots
        beyond the round's own refills (all but M before the first round) are filled first,
        then the refills train, and the first ``--buffer_size`` finishers update the server."""
        m = self.runs[0].cfg.buffered_clients
        for j in range(len(buffer.schedule.ids.reshape(-1))):  # at most one batch a slot
            extra_cohort, extra_plans = self._refills(round_index, buffer, planned=plans, extra=j)
            if not any(len(p.clients) for p in extra_plans):
                break
            key = self.axis.stack([keys.refill_key(r.cfg.seed, round_index, j) for r in self.runs])
            filled, buffer = self._store(server, store, buffer, extra_cohort, extra_plans, key)
            server, store = filled.server, filled.store  # handed back as they were (donated)
        out, buffer = self._store(server, store, buffer, cohort, plans, self.round_key(round_index))
        weights, counts, schedules, fields = [], [], [], []
        for i, run in enumerate(self.runs):
            before = self.axis.part(buffer.schedule, i)
            update, s = buffered_lib.next_update(before, m, run.cfg.staleness)
            weights.append(update.weights)
            # FedPM's Beta server counts each mask as s(tau) of one; a dense method's step is
            # FedBuff's sum of s(tau)-weighted updates over the buffer's M.
            counts.append(np.float32(update.weights.sum() if self.spec.masked else len(update.slots)))
            schedules.append(s)
            taken = len(update.slots)
            fields.append({"sim_round_s": update.time - float(before.clock),
                           **dict(zip(buffered_lib.UPDATE_FIELDS,
                                      (taken, float(update.staleness.mean()) if taken else 0.0,
                                       int(update.staleness.max()) if taken else 0)))})
        weights = self._place(self.axis.stack(weights, xp=np), self.axis.spec())
        counts = self._place(self.axis.stack(counts, xp=np), self.axis.spec())
        server = self.round_fn.aggregate(out.server, out.contributions, weights, counts)
        metrics = dict(out.metrics, **{k: self.axis.stack([np.asarray(f[k]) for f in fields], xp=np) for k in fields[0]})
        return out._replace(server=server, metrics=metrics,
                            contributions=Buffer(out.contributions, self.axis.stack(schedules, xp=np)))

    def round_seconds(self, plans: Sequence[federation.RoundPlan], output: engine.RoundOutput,
                      metrics: Sequence[dict[str, float]]) -> list[float]:
        """Each run's round on the simulated clock (``Federation.round_seconds``), from its
        clients' messages: the coded uplink where the method codes it, else its bits."""
        if self.buffered:
            return [m["sim_round_s"] for m in metrics]
        n = self.num_params
        per_client = jax.device_get(output.per_client) if output.per_client else None
        seconds = []
        for i, (run, plan) in enumerate(zip(self.runs, plans)):
            uplink = np.zeros(len(plan.clients))
            if per_client is not None:
                part = self.axis.part(per_client, i)
                uplink = n * np.asarray(part[self.uplink_metric if self.uplink_metric in part else "uplink_bpp"],
                                        np.float64)
            downlink = n * metrics[i].get("downlink_bpp", 0.0)
            seconds.append(run.federation.round_seconds(plan, uplink, downlink))
        return seconds

    @property
    def round_metrics(self) -> tuple[str, ...]:
        """The round metrics that describe the round rather than its clients: a record keeps
        them when no client reported (``engine.ROUND_METRICS``; buffered, the server update's)."""
        return engine.ROUND_METRICS + (buffered_lib.UPDATE_FIELDS if self.buffered else ())

    @property
    def uplink_metric(self) -> str:
        """The client metric of its message's size in bits per parameter, as the method sends it."""
        coded = self.spec.shows.coded_uplink
        return coded.metric if coded else "uplink_bpp"

    def round_key(self, round_index: int) -> jax.Array:
        return self.axis.stack([keys.round_key(r.cfg.seed, round_index) for r in self.runs])

    def eval_key(self, round_index: int) -> jax.Array:
        return self.axis.stack([keys.eval_key(r.cfg.seed, round_index) for r in self.runs])

    def round(self, server, store, cohort: engine.Cohort, round_index: int, buffer: "Buffer | None" = None,
              plans=None) -> engine.RoundOutput:
        """Every run's round ``round_index`` (0-based) over ``cohort``; buffered (``buffer``,
        with ``round_plan``'s ``plans``): the refills train, the first finishers update the
        server, and the output's ``contributions`` is the new ``Buffer``."""
        if buffer is not None:
            return self._buffered_round(server, store, cohort, round_index, buffer, plans)
        return self.round_fn(server, store, self.data, cohort, self.round_key(round_index))

    def compile(self, server, store, buffer: "Buffer | None" = None) -> float:
        """Compiles the round and the evaluation ahead of time; returns the seconds it took."""
        t0 = time.perf_counter()
        if buffer is not None:
            cohort, plans = self.round_plan(0, buffer)
            self.round_fn.compile(server, store, self.data, cohort, self.round_key(0),
                                  self._kept(buffer, plans, int(np.shape(cohort.ids)[-1])))
        else:
            self.round_fn.compile(server, store, self.data, self.cohort(0), self.round_key(0))
        self.eval_fn = self.eval_fn.lower(server, self.x_test, self.y_test, self.eval_key(0)).compile()
        return time.perf_counter() - t0

    def evaluate(self, server, round_index: int) -> list[dict[str, float]]:
        """Each run's evaluation."""
        return self._per_run(self.eval_fn(server, self.x_test, self.y_test, self.eval_key(round_index)))

    def metrics(self, output: engine.RoundOutput) -> list[dict[str, float]]:
        """Each run's round metrics, on the host."""
        return self._per_run(output.metrics)

    def _per_run(self, values: dict) -> list[dict[str, float]]:
        values = jax.device_get(values)
        return [{k: float(v) for k, v in self.axis.part(values, i).items()} for i in range(len(self.runs))]

    def part(self, tree, i: int):
        """Run ``i``'s part of a program's pytree (a server state, a round's output)."""
        return self.axis.part(tree, i)

    def describe(self) -> str:
        cfg = self.runs[0].cfg
        what = "mask entries" if self.spec.masked else "parameters"
        runs = (f"{len(self.runs)} runs in one program ({self.engine_config.runs_vectorized} vmapped at a time), "
                if len(self.runs) > 1 else "")
        return (f"fedmask_jax: {runs}{cfg.algorithm} {cfg.model} on {cfg.dataset} "
                f"({self.num_params:,} {what}), {cfg.clients_per_round} of {cfg.num_clients} "
                f"clients/round, {self.strategy} strategy, chunk {self.engine_config.client_chunk_size}"
                f"{' (summed gradient)' if self.engine_config.client_grad == 'summed' else ''}, "
                f"{self.round_fn.devices} device(s), backend {jax.default_backend()}")

    def close(self) -> None:
        _close_hooks(self.runs)


def _close_hooks(runs: Sequence[Run]) -> None:
    for run in runs:
        for hook in run.hooks:
            hook.close()


def _check_partition(cfg: RunConfig, parts: Sequence[np.ndarray]) -> None:
    sizes = np.array([len(p) for p in parts])
    if sizes.min() < 1:
        raise ValueError(f"{int((sizes == 0).sum())} of --num_clients={cfg.num_clients} clients got no "
                         f"data under --split={cfg.split}; lower --num_clients or change the split")
    if cfg.batch_size > sizes.max():
        raise ValueError(f"--batch_size={cfg.batch_size} is larger than every client's data (largest "
                         f"client: {sizes.max()} examples); lower --batch_size or give clients more data")


def _check_counts(cfg: RunConfig, examples: int) -> None:
    """Told from the counts alone, before a partition of that many clients is drawn."""
    if cfg.num_clients > examples:
        held = (f" left by --validation_fraction={cfg.validation_fraction:g}" if cfg.validation_fraction > 0 else "")
        raise ValueError(f"--num_clients={cfg.num_clients} is more than the {examples} training examples"
                         f"{held} of --dataset={cfg.dataset}, and every client needs at least one; "
                         f"choose at most {examples}")


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _check_memory(runs: Sequence[Run], engine_config: engine.EngineConfig, mesh: Mesh, dataset: Dataset,
                  backend: str) -> None:
    """Refuses a run whose arrays cannot fit its device, before any of them is allocated: a
    population too large for its per-client arrays would otherwise spend minutes building
    them and then die of an out-of-memory error."""
    available = engine.device_memory_bytes(backend)
    if available is None:
        return
    cfg, algorithm, width = runs[0].cfg, runs[0].algorithm, _index_width(runs)
    per_device = -(-len(runs) // mesh.shape.get(engine.RUNS_AXIS, 1))
    parts = engine.memory_needed(algorithm, engine_config, num_clients=cfg.num_clients, index_width=width,
                                 runs=len(runs), runs_per_device=per_device,
                                 slots=cfg.slots if cfg.aggregation == "buffered" else 0)
    parts["training and test data"] = sum(a.nbytes for a in (dataset.x_train, dataset.y_train,
                                                             dataset.x_test, dataset.y_test))
    needed = sum(parts.values())
    if needed <= available:
        return
    largest = max(parts, key=parts.get)
    fix = {
        "client index": f"lower --num_clients, or cap the widest client ({width} examples, the width "
                        "every client's row is padded to) with --max_examples_per_client",
        "persistent client states": f"lower --num_clients (each client keeps "
                                    f"{_size(parts[largest] / cfg.num_clients / per_device)} "
                                    "across rounds), or run without the setting that keeps it",
        "client chunk": "lower --client_chunk_size",
        "collected messages": "check fewer clients' messages per round (--verify_coded_clients)",
        "buffered contributions": "lower --concurrency",
        "training and test data": "choose a smaller --dataset",
    }[largest]
    if len(runs) > 1:
        fix += ", or put fewer runs in one program (--max_runs_per_program)"
    where = "this machine has" if backend == "cpu" else f"one {backend} device has"
    raise ValueError(
        f"--num_clients={cfg.num_clients} --clients_per_round={cfg.clients_per_round}"
        f"{f' ({len(runs)} runs in one program)' if len(runs) > 1 else ''} needs about {_size(needed)} of memory ("
        + ", ".join(f"{k} {_size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
        + f") and {where} {_size(available)}; {fix}")


def _trained_per_round(cfg: RunConfig) -> int:
    """Clients a round trains: its cohort, or buffered aggregation's refills."""
    return cfg.buffered_clients if cfg.aggregation == "buffered" else cfg.clients_per_round


def _clocked_metrics(spec: MethodSpec, runs: Sequence[Run]) -> tuple[str, ...]:
    """The client metrics the simulated clock reads client by client: none unless a bandwidth
    is finite (so that a run without a network model compiles the program it always had)."""
    if not any(r.federation.network.limited for r in runs) and runs[0].cfg.aggregation == "sync":
        return ()
    coded = spec.shows.coded_uplink
    return ("uplink_bpp", *((coded.metric,) if coded else ()))


def _index_width(runs: Sequence[Run]) -> int:
    """The widest client of any run: every run's index is padded to it (padding changes no
    result: extra steps are masked)."""
    return max(len(p) for run in runs for p in run.partition)


def _client_data(x: np.ndarray, y: np.ndarray, runs: Sequence[Run]) -> engine.ClientData:
    """The runs' client data: shared examples, each run's index and sizes on the runs axis."""
    width, axis = _index_width(runs), RunsAxis(len(runs))
    datas = [engine.client_data_from_partition(x, y, run.partition, width=width) for run in runs]
    return datas[0]._replace(index=axis.stack([d.index for d in datas]), sizes=axis.stack([d.sizes for d in datas]))


def build(cfgs: RunConfig | Sequence[RunConfig], *, dataset: Dataset | None = None,
          workdirs: str | Sequence[str | None] | None = None) -> Experiment:
    """Everything ``cfgs`` describe, ready to run. ``dataset``: use this one instead of
    loading it; ``workdirs``: where each run's hooks may write files (None: nowhere)."""
    cfgs = [cfgs] if isinstance(cfgs, RunConfig) else list(cfgs)
    workdirs = [workdirs] * len(cfgs) if workdirs is None or isinstance(workdirs, str) else list(workdirs)
    cfg = cfgs[0]
    if len({shape_key(c) for c in cfgs}) != 1:
        raise ValueError("runs in one program must share every setting but the ones that may vary")
    if dataset is None:
        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir,
                               archive_dirs=[cfg.archive_dir] if cfg.archive_dir else [],
                               download=cfg.download)
    partitions = []
    for c in cfgs:
        if c.split == "noniid" and c.classes_per_client > dataset.num_classes:
            raise ValueError(f"--classes_per_client={c.classes_per_client} is more than the "
                             f"{dataset.num_classes} classes of --dataset={c.dataset}; choose at most "
                             f"{dataset.num_classes}")
        ds = holdout_validation(dataset, c.validation_fraction, c.seed) if c.validation_fraction > 0 else dataset
        _check_counts(c, len(ds.y_train))
        parts = partition(ds.y_train, c.num_clients, c.split, seed=c.seed,
                          classes_per_client=c.classes_per_client, dirichlet_alpha=c.dirichlet_alpha,
                          max_examples_per_client=c.max_examples_per_client or None)
        _check_partition(c, parts)
        partitions.append(parts)
    federations = [federation.build(c, np.array([len(p) for p in parts])) for c, parts in zip(cfgs, partitions)]
    if cfg.validation_fraction > 0:  # tuning: evaluate on held-out training data (same seed in a batch)
        dataset = holdout_validation(dataset, cfg.validation_fraction, cfg.seed)

    spec = registry.spec(cfg.algorithm)
    arch = models.Architecture(cfg.model, dataset.num_classes, dataset.input_shape, cfg.width,
                               tuple(cfg.mlp_hidden))
    methods = [c.method_config for c in cfgs]
    algorithms = [spec.build(arch, m) for m in methods]  # all of them before any hook starts work
    runs = [Run(c, m, parts, alg, fed,
                list(spec.host_hooks(HostContext(alg, m, arch, c.seed, _trained_per_round(c), w, c.verbose,
                                                 num_clients=c.num_clients, rounds=c.rounds,
                                                 uniform_sampling=fed.uniform_sampling and c.aggregation == "sync",
                                                 synchronous=c.aggregation == "sync"))))
            for c, m, w, parts, fed, alg in zip(cfgs, methods, workdirs, partitions, federations, algorithms)]
    axis, program_alg = RunsAxis(len(runs)), runs[0].algorithm  # the program traces run 0's algorithm

    backend = jax.default_backend()
    conv.set_cpu_kernel(cfg.cpu_conv)  # read when the round and evaluation are traced
    conv.set_conv_precision(cfg.conv_precision)
    plan = engine.plan_execution(cfg.replace(clients_per_round=_trained_per_round(cfg)), runs=len(runs), num_params=program_alg.num_params, conv=arch.conv,
                                 backend=backend, separable_step=program_alg.separable_step)
    strategy = plan.strategy
    if len(runs) > 1 and strategy != "scan":
        raise ValueError(f"runs share one program only with --strategy=scan (this one is {strategy}); "
                         "run them one at a time")
    engine_config = engine.EngineConfig(cfg.batch_size, cfg.local_epochs, plan.client_chunk_size,
                                        client_grad=plan.client_grad,
                                        cpu_ynn_fusions=cfg.cpu_ynn_fusions,
                                        collect=max([h.collect for h in runs[0].hooks], default=0),
                                        per_client=_clocked_metrics(spec, runs),
                                        store_contributions=cfg.aggregation == "buffered",
                                        runs_vectorized=plan.runs_vectorized)
    mesh = axis.mesh(cfg.num_devices, strategy)
    distributed.check_mesh(mesh.devices.flat, strategy)  # several processes: one mesh over all
    try:
        _check_memory(runs, engine_config, mesh, dataset, backend)
    except ValueError:
        _close_hooks(runs)
        raise
    round_fn = engine.make_round_fn(program_alg, engine_config, strategy, mesh, runs=len(runs))
    eval_fn = engine.make_eval_fn(program_alg, cfg.eval_batch_size, engine.compiler_options(engine_config),
                                  runs=len(runs), runs_vectorized=engine_config.runs_vectorized)
    data = _client_data(dataset.x_train, dataset.y_train, runs)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test, jnp.int32)
    exp = Experiment(runs, spec, dataset, arch, engine_config, strategy, mesh, round_fn, eval_fn, data,
                     x_test, y_test)
    if mesh.size > 1:
        rep, per_run = PartitionSpec(), axis.spec()
        exp.data = distributed.put(data, engine.ClientData(*(NamedSharding(mesh, s) for s in (rep, rep, per_run, per_run))))
    return exp
