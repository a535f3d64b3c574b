"""Launching experiments.run points: as a subprocess each, or parsed into settings for a
batch (shared by the sweep and the comparison)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from experiments import exit_codes

LOG_NAME = "sweep_log.txt"


def point_argv(point: dict[str, str], workdir: str, passthrough: list[str]) -> list[str]:
    """experiments.run's arguments for ``point``: ``passthrough``, then the point's flags, its
    workdir and ``--resume`` (later flags win)."""
    return [*passthrough, *(f"--{k}={v}" for k, v in point.items()), f"--workdir={workdir}", "--resume"]


def parse_point(argv: list[str]):
    """The ``RunConfig`` experiments.run would run with ``argv`` (a ValueError if it would
    refuse them). Flags that are not experiments.run's (absl's own) are left alone."""
    from absl import flags

    from fedmask_jax.run_config import config_from_flags, define_flags

    values = flags.FlagValues()
    define_flags(values)
    try:
        values(["experiments.run", *argv], known_only=True)
    except flags.Error as e:
        raise ValueError(str(e)) from None
    return config_from_flags(values)


def run_point(point: dict[str, str], workdir: str, passthrough: list[str]) -> int:
    """Runs ``experiments.run`` with ``passthrough`` then ``point``'s flags in ``workdir`` with
    ``--resume`` (so a finished or interrupted run is continued, not redone); its output is
    appended to ``<workdir>/sweep_log.txt``. Returns the exit code."""
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.run", *point_argv(point, workdir, passthrough)]
    with open(os.path.join(workdir, LOG_NAME), "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return call(cmd, log)


def call(cmd: list[str], log) -> int:
    """Runs ``cmd`` with its output in ``log``; returns its exit code. Interrupted (Ctrl-C, or
    SIGTERM as ``cli.Terminated``), it hands the signal on and waits for the child to stop
    on its own, with its rounds on disk, before the interruption goes on up;
    ``subprocess.call`` would kill it at once instead."""
    from experiments import cli

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        return proc.wait()
    except KeyboardInterrupt as e:
        # The child may have had the signal already (a terminal signals the process group):
        # experiments.run ignores a second one, so it is always safe to send.
        proc.send_signal(signal.SIGTERM if isinstance(e, cli.Terminated) else signal.SIGINT)
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def stop_if_stopped(rc: int) -> None:
    """A run that was interrupted or terminated stops the command that started it (a sweep,
    a comparison), as if it had been."""
    from experiments import cli

    if rc == exit_codes.INTERRUPTED:
        raise KeyboardInterrupt()
    if rc == exit_codes.TERMINATED:
        raise cli.Terminated()


def sweep_locks(sweep_dir: str, index: int, count: int) -> list:
    """The locks a sweep holds on its folder while it runs ``--shard=index/count``.

    Two sweeps on one folder would take over each other's points. The shards of one sweep
    (on several hosts) share the folder: each holds it shared and its own shard exclusively;
    an unsharded sweep holds it alone.
    """
    from fedmask_jax.outputs import WorkdirLock

    locks = [WorkdirLock(sweep_dir, "--sweep_dir", "sweep", shared=count > 1)]
    if count > 1:
        locks.append(WorkdirLock(sweep_dir, "--sweep_dir", f"sweep of --shard={index}/{count}",
                                 name=f".lock-shard-{index}-of-{count}"))
    return locks


def outcome(rc: int, log: str) -> str:
    """A point's status from its exit code: a diverged run is a result, not a failure."""
    if rc == exit_codes.OK:
        return "done"
    if rc == exit_codes.DIVERGED:
        return "diverged"
    return f"failed (exit {rc}, see {log})"
