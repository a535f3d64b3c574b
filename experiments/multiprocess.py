"""One run as several ``jax.distributed`` processes on this host, each with virtual CPU devices.

    python -m experiments.multiprocess --processes=2 --cpu_devices=2 [--compare] -- RUN_FLAGS...

Starts ``--processes`` copies of ``experiments.run RUN_FLAGS --distributed`` with
``--cpu_devices`` CPU devices each, coordinated over 127.0.0.1 on a free port: the round's
mesh spans all their devices, and process 0 alone writes the workdir (its console is this
one; the others' output is shown only if they fail). If one process fails the others are
stopped. ``--compare`` then runs the same flags in one process with as many devices in all
(``<workdir>_one_process``) and checks that every round's record agrees, field by field,
timings aside (relative 1e-5: the cross-process sum adds in another order); exit code 1 if
not. Exit code: the first failing process's, else 0.

For several hosts, run ``experiments.run --distributed --coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on each instead.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import exit_codes

F = flags.FLAGS
flags.DEFINE_integer("processes", 2, "Processes of the run.", lower_bound=1)
flags.DEFINE_integer("cpu_devices", 2, "Virtual CPU devices per process (JAX_NUM_CPU_DEVICES).",
                     lower_bound=1)
flags.DEFINE_bool("compare", False, "Also run it in one process with processes x cpu_devices "
                  "devices and compare the records.")
flags.DEFINE_float("timeout_s", 0, "Stop every process after this many seconds (0 = no limit).",
                   lower_bound=0)

RTOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port free on the loopback address now (the coordinator binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    # XLA_FLAGS' own device count would fight JAX_NUM_CPU_DEVICES.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


try:  # Linux: a child asks for SIGKILL when the launcher dies, however it dies
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """Runs in a child between fork and exec."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def launch(run_flags: list[str], processes: int, cpu_devices: int, timeout_s: float = 0) -> int:
    """Runs ``experiments.run run_flags`` as ``processes`` distributed processes; returns the
    exit code (the first failing process's, 124 on the timeout, else 0)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Bind the coordination service to the loopback address only (JAX's default is every one).
    env = cpu_env(cpu_devices, JAX_COORDINATOR_BIND_ADDRESS=address)
    procs, logs = [], []
    start, rc = time.monotonic(), 0
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for i in range(processes):
            cmd = [sys.executable, "-m", "experiments.run", *run_flags, "--distributed",
                   f"--coordinator_address={address}", f"--num_processes={processes}", f"--process_id={i}"]
            log = None if i == 0 else tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log and subprocess.STDOUT,
                                          preexec_fn=_die_with_parent))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, rc = failed[0]
                rc = 128 - rc if rc < 0 else rc  # killed by a signal: the shell's code for it
                print(f"multiprocess: process {i} exited with code {rc}; stopping the others",
                      file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in codes):
                break
            if timeout_s and time.monotonic() - start > timeout_s:
                print(f"multiprocess: still running after {timeout_s:.0f}s; stopping every process",
                      file=sys.stderr, flush=True)
                rc = exit_codes.TIMED_OUT
                break
            time.sleep(0.2)
    except _Stopped as e:
        print(f"multiprocess: {e}; stopping every process", file=sys.stderr, flush=True)
        rc = exit_codes.TERMINATED
    finally:
        _stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
    for i, log in enumerate(logs):
        if log is not None:
            if rc:
                log.seek(0)
                lines = [line for line in log.read().splitlines()
                         if not line.startswith(("[Gloo]", "Extension modules:"))]
                tail = "\n".join(lines[-60:])
                print(f"--- process {i} (exit {procs[i].returncode}), last lines:\n{tail}", file=sys.stderr)
            log.close()
    return rc


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def timing(key: str) -> bool:
    return key.endswith("time_s") or key == "elapsed_s"


def compare_records(a: list[dict], b: list[dict], rtol: float = RTOL) -> tuple[list[str], int, float]:
    """(differences, values compared, largest relative difference) of two runs' records,
    timings aside."""
    problems, compared, worst = [], 0, 0.0
    if [r.get("round") for r in a] != [r.get("round") for r in b]:
        return [f"rounds differ: {[r.get('round') for r in a]} vs {[r.get('round') for r in b]}"], 0, math.inf
    for ra, rb in zip(a, b):
        keys_a, keys_b = {k for k in ra if not timing(k)}, {k for k in rb if not timing(k)}
        if keys_a != keys_b:
            problems.append(f"round {ra['round']}: fields differ: {sorted(keys_a ^ keys_b)}")
        for k in sorted(keys_a & keys_b):
            x, y = ra[k], rb[k]
            compared += 1
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
                rel = abs(x - y) / max(1.0, abs(x), abs(y))
                worst = max(worst, rel)
                if not rel <= rtol:
                    problems.append(f"round {ra['round']}: {k} {x!r} vs {y!r}")
            elif x != y:
                problems.append(f"round {ra['round']}: {k} {x!r} vs {y!r}")
    return problems, compared, worst


def main(argv):
    run_flags = argv[1:]
    from experiments.launch import parse_point

    try:
        cfg = parse_point(run_flags)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    total = F.processes * F.cpu_devices
    print(f"multiprocess: {F.processes} processes x {F.cpu_devices} CPU devices ({total} in all)", flush=True)
    rc = launch(run_flags, F.processes, F.cpu_devices, F.timeout_s)
    if rc or not F.compare:
        return rc
    one = cfg.workdir.rstrip("/") + "_one_process"
    print(f"multiprocess: the same run in one process with {total} devices -> {one}", flush=True)
    cmd = [sys.executable, "-m", "experiments.run", *run_flags, f"--workdir={one}"]
    try:
        rc = subprocess.call(cmd, env=cpu_env(total), cwd=ROOT, stdout=subprocess.DEVNULL,
                             timeout=F.timeout_s or None, preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        rc = exit_codes.TIMED_OUT
    rc = 128 - rc if rc < 0 else rc
    if rc:
        print(f"multiprocess: the one-process run exited with code {rc}", file=sys.stderr)
        return rc
    problems, compared, worst = compare_records(_records(cfg.workdir), _records(one))
    if problems:
        print(f"multiprocess: MISMATCH, {len(problems)} of {compared} values:\n  " + "\n  ".join(problems[:20]),
              file=sys.stderr)
        return exit_codes.FAILED
    print(f"multiprocess: {F.processes} processes match one process: {compared} values in "
          f"{len(_records(one))} records, largest relative difference {worst:.2g}", flush=True)
    return exit_codes.OK


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
