"""Several processes, one run: ``jax.distributed`` set up for the simulator.

Every process runs the same program (SPMD, multi-controller JAX): each builds the same data,
partition, cohorts and keys from the same settings, and the round's ``clients`` (or ``runs``
x ``clients``) mesh spans every process's devices, so each process trains the cohort
positions of its own devices and the ``psum`` of the round combines them across processes
(on CPU through gloo's TCP collectives). Host values that enter the mesh (the client data,
the initial state, each round's cohort) are put on it by ``put``: every process fills its own
devices' shards from its own copy. Only process 0 writes anything: the workdir lock,
config.json, metrics, TensorBoard, plots, summary, the model file and the checkpoints'
integrity records (orbax saves the checkpoints themselves with every process taking part).
If one process dies, JAX's coordination service stops the others once it has missed that
process's heartbeats for ``HEARTBEAT_TIMEOUT_S``; ``experiments.multiprocess`` stops them at once.

``experiments.run --distributed`` calls ``initialize``; ``experiments.multiprocess`` starts
N such processes on one host (loopback only) and compares them with one process.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Sharding


# How long a process may go without a heartbeat before the coordination service declares it
# dead and stops every process (JAX's default is 100 s). Longer: on a loaded 2-core machine,
# two processes compiling at once went 100 s without one and were both aborted.
HEARTBEAT_TIMEOUT_S = 600


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, initialization_timeout: int = 300) -> None:
    """``jax.distributed.initialize`` before any JAX computation. Arguments left None come
    from JAX's own discovery (``JAX_COORDINATOR_ADDRESS``, Slurm, Open MPI, TPU pods).
    On CPU, cross-process collectives use gloo (JAX's default; set here in case a newer JAX
    leaves it unset)."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service catches SIGTERM (to checkpoint at a sync point, which this
    # simulator does not use) and goes on running; without it SIGTERM ends a process as usual.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    if jax.default_backend() == "cpu":
        # A multi-process CPU program loaded from JAX's persistent compilation cache hung in
        # its first cross-process collective (jaxlib 0.10.2: both processes waited in the
        # round for good, where the same program compiled afresh runs); so compile afresh.
        jax.config.update("jax_enable_compilation_cache", False)


def is_primary() -> bool:
    """Whether this process writes the run's outputs (process 0; always, in one process)."""
    return jax.process_index() == 0


def multiprocess() -> bool:
    return jax.process_count() > 1


def check_mesh(devices: Sequence, strategy: str) -> None:
    """In a multi-process run, the round must be one program over devices of every process:
    the scanned round on a mesh that reaches all of them (a ValueError otherwise)."""
    if not multiprocess():
        return
    if strategy != "scan":
        raise ValueError(f"a multi-process run (--distributed) needs --strategy=scan; {strategy} "
                         "drives one device from one process")
    have = {d.process_index for d in devices}
    if have != set(range(jax.process_count())):
        raise ValueError(f"the mesh's {len(devices)} device(s) belong to processes {sorted(have)} of "
                         f"{jax.process_count()}: every process needs devices in it "
                         f"(--num_devices=0 takes all {jax.device_count()})")


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` (a sharding, or a tree prefix of them), also when
    the shardings span several processes: every process holds the whole host value (the
    same everywhere: it comes from the same settings and seed) and fills its own devices'
    shards from it; typed PRNG keys travel as their key data."""
    if not multiprocess():
        return jax.device_put(tree, shardings)
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put_leaf(x, s), sub), shardings, tree)


def _put_leaf(x, sharding: Sharding):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put_leaf(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (no-op in one process)."""
    if multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
