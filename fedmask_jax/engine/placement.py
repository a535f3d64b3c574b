"""Where a round program runs: its device meshes. ``clients_mesh`` for one run (the cohort
sharded over ``clients``), ``runs_mesh`` for several runs in one program (``runs`` x
``clients``)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh


CLIENTS_AXIS = "clients"
RUNS_AXIS = "runs"


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
