"""Room in XLA:CPU's thread pool for programs that run collectives over virtual host devices.

XLA:CPU runs each virtual host device's share of a multi-device program as one task on a thread
pool of max(cores, devices) threads (on a 2-core machine with 8 devices: 8). A collective holds
its thread until every device of its group has arrived. When two such programs are in flight at
once (JAX dispatches asynchronously), each can hold part of the pool while waiting for tasks
that are queued behind the other's: neither finishes, and after XLA's collective timeout the
process aborts ("Expected 4 threads to join the rendezvous, but only 3 of them arrived").
PJRT's CPU client sizes that pool from the PJRT_NPROC environment variable when it is set, so
reserving a few threads per device before the backend starts leaves room for several programs
in flight. It only matters for virtual devices on a CPU; a real accelerator is not affected.
"""
from __future__ import annotations

import os
import re

# Programs in flight at once that the pool can hold; the run loop has at most a few.
PROGRAMS_IN_FLIGHT = 4


def requested_host_devices(environ=os.environ) -> int:
    """The virtual CPU device count asked for through XLA_FLAGS or JAX_NUM_CPU_DEVICES (1 if none)."""
    counts = [int(m) for m in re.findall(r"--xla_force_host_platform_device_count=(\d+)",
                                         environ.get("XLA_FLAGS", ""))]
    if environ.get("JAX_NUM_CPU_DEVICES", "").isdigit():
        counts.append(int(environ["JAX_NUM_CPU_DEVICES"]))
    return max(counts, default=1)


def reserve_collective_threads(environ=os.environ) -> None:
    """Sets PJRT_NPROC (unless the user set it or NPROC) for several multi-device programs in flight.

    It must run before JAX starts its CPU backend, so the package runs it on import.
    """
    devices = requested_host_devices(environ)
    if devices > 1 and "PJRT_NPROC" not in environ and "NPROC" not in environ:
        environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, PROGRAMS_IN_FLIGHT * devices))
