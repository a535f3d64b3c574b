"""Launching one experiments.run as a subprocess (shared by the sweep and the comparison)."""

from __future__ import annotations

import os
import subprocess
import sys

LOG_NAME = "sweep_log.txt"


def run_point(point: dict[str, str], workdir: str, passthrough: list[str]) -> int:
    """Runs ``experiments.run`` with ``passthrough`` then ``point``'s flags in ``workdir`` with
    ``--resume`` (so a finished or interrupted run is continued, not redone); its output is
    appended to ``<workdir>/sweep_log.txt``. Returns the exit code."""
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.run", *passthrough,
           *(f"--{k}={v}" for k, v in point.items()), f"--workdir={workdir}", "--resume"]
    with open(os.path.join(workdir, LOG_NAME), "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


DIVERGED = 4  # experiments.run's exit code for a run that stopped at a non-finite loss


def outcome(rc: int, log: str) -> str:
    """A point's status from its exit code: a diverged run is a result, not a failure."""
    if rc == 0:
        return "done"
    if rc == DIVERGED:
        return "diverged"
    return f"failed (exit {rc}, see {log})"
