"""Sizing: how a run is executed on this backend and what its arrays take on the device.

``plan_execution`` makes every execution decision once (``ExecutionPlan``: strategy, client
chunk, how a chunk's gradients are taken, runs vmapped together, runs per program), from the
run's settings (``auto`` or 0 for the engine's choice) and the ``auto_*`` heuristics below;
``experiment.build``, ``experiments.run_batch`` and the benchmark (through build) all take
their decisions from it. ``memory_needed`` says, from shapes alone, what a run's arrays take.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import jax
import jax.numpy as jnp

from fedmask_jax.algorithms.base import FederatedAlgorithm
from fedmask_jax.engine.config import EngineConfig


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
                  runs: int = 1, runs_per_device: int | None = None, slots: int = 0) -> dict[str, int]:
    """What a run's arrays take on its device, in bytes, from shapes alone (nothing is
    allocated), by what sets their size: the client index (every client's row padded to the
    widest client), every client's persistent state, a vmapped chunk's working set (as
    ``auto_chunk_size`` counts it) and the messages collected per round. ``runs`` runs in one
    program, ``runs_per_device`` of them on each device (default: all); ``slots``: buffered
    aggregation's stored contributions (one parameter-sized contribution each)."""
    per_device = runs if runs_per_device is None else runs_per_device
    vectorized = min(cfg.runs_vectorized or per_device, per_device)
    return {
        "client index": per_device * num_clients * index_width * 4,
        "persistent client states": per_device * num_clients * _tree_bytes(jax.eval_shape(alg.persistent_init)),
        "client chunk": vectorized * cfg.client_chunk_size * 8 * 4 * alg.num_params,
        "collected messages": per_device * cfg.collect * message_bytes(alg),
        "buffered contributions": per_device * slots * 4 * alg.num_params,
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


class ExecutionSettings(Protocol):
    """The run settings a plan reads (``RunConfig`` has them): ``auto`` or 0 leaves the
    decision to the engine."""

    strategy: str  # "auto" or one of STRATEGIES
    client_chunk_size: int  # 0: auto_chunk_size
    client_grad: str  # "auto" or one of CLIENT_GRADS
    runs_vectorized: int  # 0: auto_runs_vectorized
    clients_per_round: int


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How runs execute here, decided once by ``plan_execution``."""

    strategy: str  # one of STRATEGIES
    client_chunk_size: int  # clients vmapped together (EngineConfig.client_chunk_size)
    client_grad: str  # one of CLIENT_GRADS (EngineConfig.client_grad)
    runs_vectorized: int  # of the planned runs in one program, how many are vmapped together
    runs_per_program: int  # how many runs one program may hold; 0: none share one (host_loop)


def plan_execution(settings: ExecutionSettings, *, runs: int, num_params: int, conv: bool,
                   backend: str | None = None, separable_step: bool = True,
                   max_runs_per_program: int = 0) -> ExecutionPlan:
    """Every execution decision for ``runs`` runs of ``settings`` (the runs share every
    shape; one run: ``runs=1``) of a model with ``num_params`` entries per client working set
    (``conv``: it has convolutions) on ``backend`` (default: JAX's). ``separable_step``: the
    method's ``FederatedAlgorithm.separable_step`` (only the client gradient reads it).

    * strategy: the setting, or ``auto_strategy``;
    * client chunk: the setting, or ``auto_chunk_size`` for ``clients_per_round`` -- each run
      is chunked as it would be alone, so that it computes the same sums;
    * client gradient: the setting, or ``auto_client_grad`` for that chunk, ``per_client``
      when the method's step is not ``separable_step``;
    * runs vectorized: the setting, or ``auto_runs_vectorized``, at most ``runs``;
    * runs per program: 0 unless the strategy is ``scan`` (runs share only a scanned program);
      then ``max_runs_per_program``, or ``auto_runs_per_program`` (at most ``runs``).
    """
    backend = backend or jax.default_backend()
    strategy = settings.strategy if settings.strategy != "auto" else auto_strategy(conv=conv, backend=backend)
    chunk = settings.client_chunk_size or auto_chunk_size(settings.clients_per_round, num_params,
                                                          conv=conv, backend=backend)
    client_grad = settings.client_grad
    if client_grad == "auto":
        client_grad = auto_client_grad(conv=conv, chunk=chunk, backend=backend) if separable_step else "per_client"
    vectorized = settings.runs_vectorized or auto_runs_vectorized(runs, num_params, chunk, backend=backend)
    if strategy != "scan":
        per_program = 0
    else:
        per_program = max_runs_per_program or auto_runs_per_program(runs, num_params, chunk, backend=backend)
    return ExecutionPlan(strategy, chunk, client_grad, min(vectorized, runs), per_program)
