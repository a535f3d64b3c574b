"""Runs a grid of experiments.run configurations.

    python -m experiments.sweep --flagfile=experiments/configs/quickstart.flags \
        --sweep='seed=0,1,2;client_lr=0.03,0.1' --sweep_dir=runs/sweep

Points that share every shape (``experiment.shape_key``: they differ only in seed, split and
the hyperparameters a method reads as values) run as one compiled program with a leading runs
axis (experiments.run_batch, one subprocess per group, at most --max_runs_per_program runs
per program); every other point, and every point with --novectorize, runs alone in its own
experiments.run subprocess. Either way each point gets its own workdir under --sweep_dir with
the outputs experiments.run writes, and runs with --resume, so re-running the same command
skips finished points and continues interrupted ones (a batch from its own checkpoints in
--sweep_dir/.batches); a failed point is recorded and the others go on. At the end the sweep writes sweep.csv, sweep.md and overlay
plots. --shard=i/n runs only every n-th point starting at i (to spread points over hosts or
accelerators); --report_only rebuilds the table from whatever has finished.

One sweep at a time per --sweep_dir (a lock, as a run's on its workdir; the shards of one
sweep share it, one process per shard; --report_only takes none). Ctrl-C or SIGTERM stops the point running (with its rounds on disk) and then the
sweep, with one line and exit code 130 or 143; the same command continues it.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import contextlib
import csv
import itertools
import json
import os
import sys

from absl import app, flags, logging

from experiments import cli, exit_codes
from experiments import run as run_flags  # noqa: F401 -- defines the flags a point may set
from experiments.launch import (LOG_NAME, call, outcome, parse_point, point_argv, run_point, stop_if_stopped,
                                sweep_locks)

F = flags.FLAGS
flags.DEFINE_string("sweep", None, "Grid: 'flag=v1,v2;other=a,b' (the cross product is run).")
flags.DEFINE_string("sweep_dir", "runs/sweep", "Folder holding one workdir per point and the table.")
flags.DEFINE_string("shard", "0/1", "i/n: run only points whose index is i modulo n.")
flags.DEFINE_bool("report_only", False, "Only rebuild the table and plots from finished points.")
flags.DEFINE_bool("vectorize", True, "Run points that share every shape as one program; "
                  "--novectorize: one process per point.")
flags.DEFINE_integer("max_runs_per_program", 0, "At most this many points in one program "
                     "(0 = as many as fit the memory budget of client chunks).", lower_bound=0)

_OWN = ("--sweep", "--sweep_dir", "--shard", "--report_only", "--noreport_only", "--workdir",
        "--vectorize", "--novectorize", "--max_runs_per_program")


def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
    if not spec:
        raise ValueError("--sweep is required, e.g. --sweep='clients_per_round=5,10;split=iid,dirichlet'")
    grid = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if "=" not in part:
            raise ValueError(f"--sweep: {part!r} is not flag=v1,v2")
        name, values = part.split("=", 1)
        name = name.strip().lstrip("-")
        if name not in F or name == "workdir":
            raise ValueError(f"--sweep: {name!r} is not a flag of experiments.run")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:  # the cross product would be empty: a sweep that runs nothing
            raise ValueError(f"--sweep: {part!r} gives {name} no values; write {name}=v1,v2")
        grid.append((name, choices))
    if not grid:
        raise ValueError(f"--sweep={spec!r} names no flag; write 'flag=v1,v2;other=a,b'")
    return grid


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard=i/n`` as (i, n), 0 <= i < n."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"--shard={text} must be i/n with 0 <= i < n, e.g. --shard=0/2 and --shard=1/2")
    return index, count


def points(grid) -> list[dict[str, str]]:
    names = [n for n, _ in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in grid))]


def point_name(point: dict[str, str]) -> str:
    return "__".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


def report(grid, sweep_dir: str, status: dict[str, str]) -> list[dict]:
    from fedmask_jax.comparison import sweep_columns
    from fedmask_jax.outputs import write_json_atomic
    from fedmask_jax.plots import plot_runs

    results = sweep_columns()
    rows, done_dirs = [], []
    for point in points(grid):
        workdir = os.path.join(sweep_dir, point_name(point))
        summary_path = os.path.join(workdir, "summary.json")
        row = dict(point)
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            row.update({c: summary.get(c) for c in results}, status="done")
            done_dirs.append(workdir)
        else:
            row.update({c: None for c in results}, status=status.get(workdir, "not run"))
        rows.append(row)
    names = [n for n, _ in grid]
    with open(os.path.join(sweep_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*names, *results, "status"])
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join([*names, *results, "status"]) + " |",
             "|" + "---|" * (len(names) + len(results) + 1)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in [*names, *results, "status"]) + " |" for r in rows]
    with open(os.path.join(sweep_dir, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_json_atomic(os.path.join(sweep_dir, "sweep.json"), rows)
    if done_dirs:
        plot_runs(done_dirs, sweep_dir)
    return rows


def groups(pending: list[tuple[dict, str]], passthrough: list[str]) -> list[list[tuple[dict, str]]]:
    """``pending`` (point, workdir) pairs grouped by shape key, in grid order. A point whose
    flags do not parse stays alone: its own process reports the error."""
    from fedmask_jax.experiment import shape_key

    out: dict = {}
    for i, (point, workdir) in enumerate(pending):
        try:
            key = shape_key(parse_point(point_argv(point, workdir, passthrough)))
        except ValueError:
            key = ("unparsable", i)
        out.setdefault(key, []).append((point, workdir))
    return list(out.values())


def run_group(group: list[tuple[dict, str]], passthrough: list[str]) -> tuple[int, str]:
    """Runs ``group`` with experiments.run_batch; returns its exit code and log path."""
    from experiments.run_batch import batch_id
    from fedmask_jax.outputs import write_json_atomic

    batches_dir = os.path.join(F.sweep_dir, ".batches")
    os.makedirs(batches_dir, exist_ok=True)
    name = "group-" + batch_id([w for _, w in group])
    spec = {"batches_dir": batches_dir, "max_runs_per_program": F.max_runs_per_program,
            "points": [{"name": point_name(p), "workdir": w, "argv": point_argv(p, w, passthrough)}
                       for p, w in group]}
    for _, w in group:
        os.makedirs(w, exist_ok=True)
    batch_file = os.path.join(batches_dir, name + ".json")
    write_json_atomic(batch_file, spec)
    log_path = os.path.join(batches_dir, name + ".log")
    cmd = [sys.executable, "-m", "experiments.run_batch", f"--batch_file={batch_file}"]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return call(cmd, log), log_path


def _finished(workdir: str) -> str | None:
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return "done" if json.load(f).get("diverged_at_round") is None else "diverged"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fedmask_jax.outputs import ensure_writable_dir

    try:
        grid = parse_grid(F.sweep)
        index, count = parse_shard(F.shard)
        ensure_writable_dir(F.sweep_dir, "--sweep_dir")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)

    locks = [] if F.report_only else sweep_locks(F.sweep_dir, index, count)
    with contextlib.ExitStack() as held:
        try:
            for lock in locks:
                held.enter_context(lock)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(exit_codes.BAD_INPUT)
        cli.stop_on_signals()
        try:
            sweep(grid, index, count)
        except KeyboardInterrupt as e:
            print(f"{cli.what(e)}: the finished points are in {F.sweep_dir}; run the same command "
                  "again to continue", file=sys.stderr)
            sys.exit(cli.exit_code(e))


def sweep(grid, index: int, count: int) -> None:
    passthrough = [a for a in sys.argv[1:] if not a.startswith(_OWN)]
    status, pending = {}, []
    for i, point in enumerate(points(grid)):
        workdir = os.path.join(F.sweep_dir, point_name(point))
        if F.report_only or i % count != index:
            continue
        if os.path.isfile(os.path.join(workdir, "summary.json")):
            print(f"sweep: {point_name(point)} already done", flush=True)
            continue
        pending.append((point, workdir))
    alone = []
    for group in (groups(pending, passthrough) if F.vectorize and len(pending) > 1 else [[p] for p in pending]):
        if len(group) == 1:
            alone += group
            continue
        print(f"sweep: running {len(group)} points sharing one shape as one program "
              f"({', '.join(point_name(p) for p, _ in group)}) ...", flush=True)
        rc, log_path = run_group(group, passthrough)
        for point, workdir in group:
            finished = _finished(workdir)
            if finished:
                status[workdir] = finished
                print(f"sweep: {point_name(point)} {finished}", flush=True)
            elif rc in (exit_codes.CANNOT_SHARE, exit_codes.BAD_INPUT):
                alone.append((point, workdir))  # one at a time: each point reports its own error
            else:
                status[workdir] = outcome(rc, log_path)
                print(f"sweep: {point_name(point)} {status[workdir]}", flush=True)
        stop_if_stopped(rc)
    for point, workdir in alone:
        print(f"sweep: running {point_name(point)} ...", flush=True)
        rc = run_point(point, workdir, passthrough)
        stop_if_stopped(rc)
        status[workdir] = outcome(rc, LOG_NAME)
        print(f"sweep: {point_name(point)} {status[workdir]}", flush=True)
    rows = report(grid, F.sweep_dir, status)
    print(open(os.path.join(F.sweep_dir, "sweep.md")).read())
    if any(r["status"].startswith("failed") for r in rows):
        sys.exit(exit_codes.FAILED)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
