"""Runs FedPM and its baselines on one setting and tabulates accuracy against uplink bits.

    python -m experiments.compare --flagfile=experiments/configs/compare_fmnist.flags

The setting (dataset, model, split, seed, rounds, clients, local epochs, batch) comes from the
run flags given here and is the same for every method, so every method sees the same client
data and the same cohorts. Each method's own hyperparameters come from
``<method_configs>/<method>.flags``, which may only set method flags (checked before anything
runs). Each method runs as an ``experiments.run`` subprocess in ``<compare_dir>/<method>``
with ``--resume``: re-running the command skips finished methods and continues interrupted
ones; a failed method is reported and the others go on.

Writes ``compare.json`` (one object per method), ``compare.md`` and the PNG plots
``compare_accuracy.png`` and ``compare_accuracy_vs_uplink.png`` in ``--compare_dir``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments import run as run_cli  # noqa: F401 -- defines the run and method flags
from experiments.launch import outcome, run_point
from fedmask_jax.algorithms.registry import METHODS, method_flag_names
from fedmask_jax.config import flag_fields
from fedmask_jax.run_config import RunConfig

F = flags.FLAGS
flags.DEFINE_list("methods", list(METHODS), "Methods to compare, in table order.")
flags.DEFINE_string("method_configs", "experiments/configs/methods",
                    "Folder holding <method>.flags with each method's hyperparameters.")
flags.DEFINE_string("compare_dir", "runs/compare", "Folder for one workdir per method and the table.")
flags.DEFINE_float("target_accuracy", 0.8, "Accuracy for the rounds-to-target and MB-to-target columns.")
flags.DEFINE_bool("report_only", False, "Only rebuild the table and plots from finished methods.")

# What a method's flagfile may set: the methods' hyperparameters (each method's config
# dataclass), never the shared setting.
METHOD_FLAGS = frozenset(method_flag_names())
_NOT_PASSED = {"workdir", "resume", "algorithm", "flagfile"}


def method_flagfile(method: str, folder: str) -> str:
    """The method's flagfile, checked: it exists, sets only method flags, names this method."""
    path = os.path.join(folder, f"{method}.flags")
    if method not in METHODS:
        raise ValueError(f"--methods: {method!r} is unknown; allowed: {', '.join(METHODS)}")
    if not os.path.isfile(path):
        raise ValueError(f"--methods: no flagfile {path} for {method!r}; write one or change "
                         "--method_configs")
    algorithm = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name = line.lstrip("-").split("=", 1)[0]
            name = name[2:] if name.startswith("no") and name[2:] in METHOD_FLAGS else name
            if name not in METHOD_FLAGS:
                raise ValueError(f"{path}:{number}: --{name} is part of the shared setting, not a "
                                 f"method hyperparameter; set it in the comparison's flags")
            if name != "algorithm" and name not in METHODS[method].config.__dataclass_fields__:
                raise ValueError(f"{path}:{number}: --{name} is not a setting of {method}")
            if name == "algorithm":
                algorithm = line.split("=", 1)[1].strip()
    if algorithm != method:
        raise ValueError(f"{path} must contain --algorithm={method}")
    return path


def shared_setting(method: str) -> list[str]:
    """The experiments.run flags given to this command, as arguments for ``method``'s run: the
    run's settings, and the method settings given here that ``method`` has."""
    names = ({f.name for f in flag_fields(RunConfig)} | METHOD_FLAGS) - _NOT_PASSED
    own = {f.name for f in flag_fields(METHODS[method].config)}
    return [F[name].serialize() for name in sorted(names)
            if F[name].present and (name not in METHOD_FLAGS or name in own)]


def report(methods: list[str], compare_dir: str, status: dict[str, str], target: float) -> list[dict]:
    from fedmask_jax import comparison
    from fedmask_jax.outputs import write_json_atomic
    from fedmask_jax.plots import plot_comparison

    rows, done = [], []
    for method in methods:
        workdir = os.path.join(compare_dir, method)
        if os.path.isfile(os.path.join(workdir, "summary.json")):
            rows.append(comparison.method_row(method, workdir, target))
            done.append((method, workdir))
        else:
            rows.append({"method": method, "status": status.get(method, "not run")})
    write_json_atomic(os.path.join(compare_dir, "compare.json"), rows)
    with open(os.path.join(compare_dir, "compare.md"), "w") as f:
        f.write(comparison.markdown_table(rows))
    if done:
        plot_comparison(done, compare_dir, target)
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        files = {m: method_flagfile(m, F.method_configs) for m in F.methods}
        if not 0 < F.target_accuracy <= 1:
            raise ValueError(f"--target_accuracy must be in (0, 1], got {F.target_accuracy}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(F.compare_dir, exist_ok=True)
    status = {}
    for method in F.methods:
        workdir = os.path.join(F.compare_dir, method)
        if F.report_only:
            continue
        if os.path.isfile(os.path.join(workdir, "summary.json")):
            print(f"compare: {method} already done", flush=True)
            continue
        print(f"compare: running {method} ({METHODS[method].description}) ...", flush=True)
        rc = run_point({"algorithm": method}, workdir, [*shared_setting(method), f"--flagfile={files[method]}"])
        status[method] = outcome(rc, f"{workdir}/sweep_log.txt")
        print(f"compare: {method} {status[method]}", flush=True)
    rows = report(F.methods, F.compare_dir, status, F.target_accuracy)
    print(open(os.path.join(F.compare_dir, "compare.md")).read())
    # A diverged method is a result (reported in the table); a failed or missing one is not.
    if any(r["status"] == "not run" or r["status"].startswith("failed") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
