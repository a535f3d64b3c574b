"""Runs a grid of experiments.run configurations, one subprocess per point.

    python -m experiments.sweep --flagfile=experiments/configs/quickstart.flags \
        --sweep='clients_per_round=5,10;split=iid,dirichlet' --sweep_dir=runs/sweep

Every point gets its own workdir under --sweep_dir and runs with --resume, so re-running the
same command skips finished points and continues interrupted ones; a failed point is
recorded and the others go on. At the end the sweep writes sweep.csv, sweep.md and overlay
plots. --shard=i/n runs only every n-th point starting at i (to spread points over hosts or
accelerators); --report_only rebuilds the table from whatever has finished.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys

from absl import app, flags, logging

from experiments import run as run_flags  # noqa: F401 -- defines the flags a point may set
from experiments.launch import outcome, run_point

F = flags.FLAGS
flags.DEFINE_string("sweep", None, "Grid: 'flag=v1,v2;other=a,b' (the cross product is run).")
flags.DEFINE_string("sweep_dir", "runs/sweep", "Folder holding one workdir per point and the table.")
flags.DEFINE_string("shard", "0/1", "i/n: run only points whose index is i modulo n.")
flags.DEFINE_bool("report_only", False, "Only rebuild the table and plots from finished points.")

_OWN = ("--sweep", "--sweep_dir", "--shard", "--report_only", "--noreport_only", "--workdir")
COLUMNS = ["final_test_accuracy", "final_test_accuracy_thresholded", "mean_uplink_bpp",
           "mean_uplink_bpp_coded_prior", "final_model_file_bpp", "steady_round_time_s",
           "total_time_s", "diverged_at_round"]


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
        grid.append((name, [v.strip() for v in values.split(",") if v.strip()]))
    return grid


def points(grid) -> list[dict[str, str]]:
    names = [n for n, _ in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in grid))]


def point_name(point: dict[str, str]) -> str:
    return "__".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


def report(grid, sweep_dir: str, status: dict[str, str]) -> list[dict]:
    from fedmask_jax.outputs import write_json_atomic
    from fedmask_jax.plots import plot_runs

    rows, done_dirs = [], []
    for point in points(grid):
        workdir = os.path.join(sweep_dir, point_name(point))
        summary_path = os.path.join(workdir, "summary.json")
        row = dict(point)
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            row.update({c: summary.get(c) for c in COLUMNS}, status="done")
            done_dirs.append(workdir)
        else:
            row.update({c: None for c in COLUMNS}, status=status.get(workdir, "not run"))
        rows.append(row)
    names = [n for n, _ in grid]
    with open(os.path.join(sweep_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*names, *COLUMNS, "status"])
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join([*names, *COLUMNS, "status"]) + " |",
             "|" + "---|" * (len(names) + len(COLUMNS) + 1)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in [*names, *COLUMNS, "status"]) + " |" for r in rows]
    with open(os.path.join(sweep_dir, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_json_atomic(os.path.join(sweep_dir, "sweep.json"), rows)
    if done_dirs:
        plot_runs(done_dirs, sweep_dir)
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        grid = parse_grid(F.sweep)
        index, count = (int(x) for x in F.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError as e:
        print(f"error: {e or '--shard must be i/n with 0 <= i < n'}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(F.sweep_dir, exist_ok=True)
    passthrough = [a for a in sys.argv[1:] if not a.startswith(_OWN)]
    status = {}
    for i, point in enumerate(points(grid)):
        workdir = os.path.join(F.sweep_dir, point_name(point))
        if F.report_only or i % count != index:
            continue
        if os.path.isfile(os.path.join(workdir, "summary.json")):
            print(f"sweep: {point_name(point)} already done", flush=True)
            continue
        print(f"sweep: running {point_name(point)} ...", flush=True)
        rc = run_point(point, workdir, passthrough)
        status[workdir] = outcome(rc, "sweep_log.txt")
        print(f"sweep: {point_name(point)} {status[workdir]}", flush=True)
    rows = report(grid, F.sweep_dir, status)
    print(open(os.path.join(F.sweep_dir, "sweep.md")).read())
    if any(r["status"].startswith("failed") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
