"""Runs FedPM and its baselines on one setting and tabulates accuracy against uplink bits.

    python -m experiments.compare --flagfile=experiments/configs/compare_fmnist.flags

The setting (dataset, model, split, seed, rounds, clients, local epochs, batch) comes from the
run flags given here and is the same for every method, so every method sees the same client
data and the same cohorts. Each entry of ``--methods`` names a flagfile
``<method_configs>/<entry>.flags`` holding a method's hyperparameters: ``fedpm.flags`` for
fedpm, or a variant such as ``fedpm_kaiming.flags`` (its ``--algorithm`` says which method);
it may only set method flags (checked before anything runs). Each entry runs as an
``experiments.run`` subprocess in ``<compare_dir>/<entry>`` with ``--resume``: re-running the
command skips finished runs and continues interrupted ones; a failed run is reported and the
others go on. Ctrl-C or SIGTERM (to this process alone or to its process group) stops the run
in progress with its rounds on disk, and then the comparison (exit 130 or 143).

``--seeds`` repeats the entries of ``--seeds_for`` (``topN_baselines``: the N baselines -- not
FedPM or a descendant, ``MethodSpec.studied``: fedpm, klms -- with the best final accuracy at the setting's seed) at more seeds, in
``<compare_dir>/<entry>@seed<s>``; the table gives their mean and standard deviation.
``--second_setting`` runs ``--second_methods`` once more with those run flags added (e.g. a
non-IID split), in ``<compare_dir>/<second_name>/``, with its own table and plots.

The work runs in three parts, in this order, so that each ends with a finished table: ``first``
(every ``--methods`` entry once in the setting), ``second`` (the second setting), ``seeds``
(the other seeds). ``--parts`` runs only some of them (the others' tables are rebuilt from
their finished runs); the exit status then speaks only for the parts it ran.

A method flagfile may include another with ``--flagfile=<path>`` (relative to the working
directory, as absl reads it), e.g. to take a tuned method's values and override one; later
lines win.

``--finished_runs`` names a folder of finished runs' records laid out as ``--compare_dir``
(config.json, metrics.jsonl, summary.json: what a committed results folder keeps); those the
compare dir lacks are copied in before anything runs, so that a fresh checkout rebuilds the
tables from them instead of running again.

Writes ``compare.json`` (one object per run), ``compare.md`` and the PNG plots
``compare_accuracy.png`` and ``compare_accuracy_vs_uplink.png`` in each setting's folder; with
``--seeds``, the mean ± std table at the end of ``compare.md`` and
``compare_seeds_accuracy.png``/``compare_seeds_accuracy_vs_uplink.png``.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import os
import signal
import sys

from absl import app, flags, logging

from experiments import cli, exit_codes
from experiments import run as run_cli  # noqa: F401 -- defines the run and method flags
from experiments.launch import outcome, run_point, stop_if_stopped
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
flags.DEFINE_string("finished_runs", "", "A folder of finished runs' records (config.json, metrics.jsonl, "
                    "summary.json), laid out as --compare_dir: each one --compare_dir lacks is copied in "
                    "first and counts as done (e.g. the committed results/conv4_cpu/...).")
flags.DEFINE_list("seeds", [], "More seeds for the --seeds_for entries (beside the setting's --seed).")
flags.DEFINE_list("seeds_for", [], "Entries repeated at every --seeds seed; topN_baselines = the N "
                  "baselines with the best final accuracy at the setting's seed.")
flags.DEFINE_string("second_setting", "", "Run flags of a second setting for --second_methods, e.g. "
                    "'--split=noniid --classes_per_client=2' (empty: none).")
flags.DEFINE_list("second_methods", [], "Entries run in the second setting.")
flags.DEFINE_string("second_name", "noniid", "Folder (under --compare_dir) of the second setting.")
PARTS = ("first", "second", "seeds")
flags.DEFINE_list("parts", list(PARTS), "Parts to run, of: first (every --methods entry once), "
                  "second (the second setting), seeds (the --seeds runs); always run in that "
                  "order. The other parts' tables are rebuilt from their finished runs.")

# What a method's flagfile may set: the methods' hyperparameters (each method's config
# dataclass), never the shared setting.
METHOD_FLAGS = frozenset(method_flag_names())
_NOT_PASSED = {"workdir", "resume", "algorithm", "flagfile"}


def _method_lines(path: str, seen: tuple[str, ...] = ()):
    """``(file, line number, line)`` of a method flagfile's flags, with each ``--flagfile=``
    line replaced by the lines of the file it names (opened as absl opens it)."""
    if os.path.abspath(path) in seen:
        raise ValueError(f"{path}: includes itself (--flagfile= cycle through {', '.join(seen)})")
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--flagfile="):
            nested = line.split("=", 1)[1].strip()
            if not os.path.isfile(nested):
                raise ValueError(f"{path}:{number}: --flagfile={nested}: no such file (a path "
                                 "relative to the working directory)")
            yield from _method_lines(nested, (*seen, os.path.abspath(path)))
        else:
            yield path, number, line


def entry_algorithm(entry: str, folder: str) -> str:
    """The method an entry's flagfile runs (checked as ``method_flagfile`` checks it)."""
    method_flagfile(entry, folder)
    algorithm = None
    for _, _, line in _method_lines(os.path.join(folder, f"{entry}.flags")):
        if line.startswith("--algorithm="):
            algorithm = line.split("=", 1)[1].strip()  # the last one wins, as in absl
    assert algorithm is not None, "unreachable: method_flagfile checked --algorithm"
    return algorithm


def method_flagfile(method: str, folder: str) -> str:
    """An entry's flagfile, checked: it exists, sets only method flags (in it or in the files
    it includes), and names a method -- the entry itself when the entry is a method's name,
    any method for a variant."""
    path = os.path.join(folder, f"{method}.flags")
    if not os.path.isfile(path):
        if method not in METHODS:
            raise ValueError(f"--methods: {method!r} is unknown: neither a method ({', '.join(METHODS)}) "
                             f"nor a flagfile {path}")
        raise ValueError(f"--methods: no flagfile {path} for {method!r}; write one or change "
                         "--method_configs")
    algorithm = None
    for where, number, line in _method_lines(path):
        name = line.lstrip("-").split("=", 1)[0]
        name = name[2:] if name.startswith("no") and name[2:] in METHOD_FLAGS else name
        if name not in METHOD_FLAGS:
            raise ValueError(f"{where}:{number}: --{name} is part of the shared setting, not a "
                             f"method hyperparameter; set it in the comparison's flags")
        if name == "algorithm":
            algorithm = line.split("=", 1)[1].strip()
            if algorithm not in METHODS:
                raise ValueError(f"{where}:{number}: --algorithm={algorithm} is unknown; allowed: "
                                 f"{', '.join(METHODS)}")
        elif algorithm is None:
            raise ValueError(f"{where}:{number}: --algorithm=... must come first")
        elif name not in METHODS[algorithm].config.__dataclass_fields__:
            raise ValueError(f"{where}:{number}: --{name} is not a setting of {algorithm}")
    if algorithm is None or (method in METHODS and algorithm != method):
        raise ValueError(f"{path} must contain --algorithm={method if method in METHODS else '<method>'}")
    return path


def shared_setting(method: str) -> list[str]:
    """The experiments.run flags given to this command, as arguments for ``method``'s run: the
    run's settings, and the method settings given here that ``method`` has."""
    names = ({f.name for f in flag_fields(RunConfig)} | METHOD_FLAGS) - _NOT_PASSED
    own = {f.name for f in flag_fields(METHODS[method].config)}
    return [F[name].serialize() for name in sorted(names)
            if F[name].present and (name not in METHOD_FLAGS or name in own)]


def report(methods: list[str], compare_dir: str, status: dict[str, str], target: float,
           repeats: dict[str, list[str]] | None = None) -> list[dict]:
    """``repeats``: entry -> the run names of its other seeds (``<entry>@seed<s>``)."""
    from fedmask_jax import comparison
    from fedmask_jax.outputs import write_json_atomic
    from fedmask_jax.plots import plot_comparison, plot_seeds

    rows, done = [], []
    names = methods + [r for entry in methods for r in (repeats or {}).get(entry, [])]
    for method in names:
        workdir = os.path.join(compare_dir, method)
        if os.path.isfile(os.path.join(workdir, "summary.json")):
            rows.append(comparison.method_row(method, workdir, target))
            if method in methods:
                done.append((method, workdir))
        else:
            rows.append({"method": method, "status": status.get(method, "not run")})
    write_json_atomic(os.path.join(compare_dir, "compare.json"), rows)
    text = comparison.markdown_table(rows)
    groups = {entry: [entry, *(repeats or {}).get(entry, [])] for entry in methods if (repeats or {}).get(entry)}
    if groups:
        text += "\n" + comparison.seeds_table(rows, groups)
    with open(os.path.join(compare_dir, "compare.md"), "w") as f:
        f.write(text)
    if done:
        plot_comparison(done, compare_dir, target)
    finished = {r["method"] for r in rows if "final_test_accuracy" in r}
    seeds = {entry: [os.path.join(compare_dir, n) for n in names if n in finished] for entry, names in groups.items()}
    if any(len(dirs) > 1 for dirs in seeds.values()):
        plot_seeds({entry: dirs for entry, dirs in seeds.items() if dirs}, compare_dir, target)
    return rows


def _run(name: str, algorithm: str, compare_dir: str, passthrough: list[str], status: dict,
         seed: str | None = None) -> None:
    workdir = os.path.join(compare_dir, name)
    if os.path.isfile(os.path.join(workdir, "summary.json")):
        print(f"compare: {name} already done", flush=True)
        return
    print(f"compare: running {name} ({METHODS[algorithm].description}) ...", flush=True)
    point = {"algorithm": algorithm, **({"seed": seed} if seed is not None else {})}
    rc = run_point(point, workdir, passthrough)
    stop_if_stopped(rc)
    status[name] = outcome(rc, f"{workdir}/sweep_log.txt")
    print(f"compare: {name} {status[name]}", flush=True)


def strongest_baselines(rows: list[dict], algorithms: dict[str, str], n: int) -> list[str]:
    """The ``n`` finished entries whose method is a baseline (not ``MethodSpec.studied``:
    FedPM and its descendants) with the best final test accuracy."""
    done = [r for r in rows if "final_test_accuracy" in r and algorithms.get(r["method"]) in METHODS
            and not METHODS[algorithms[r["method"]]].studied]
    return [r["method"] for r in sorted(done, key=lambda r: -r["final_test_accuracy"])[:n]]


def _is_top(item: str) -> bool:
    return item.startswith("top") and item.endswith("_baselines")


def _seed_entries(spec: list[str], rows: list[dict], algorithms: dict[str, str]) -> list[str]:
    out = []
    for item in spec:
        if _is_top(item):
            out += strongest_baselines(rows, algorithms, int(item[3:-len("_baselines")]))
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def _check_seed_spec(spec: list[str], entries: list[str]) -> None:
    for item in spec:
        if _is_top(item):
            if not item[3:-len("_baselines")].isdigit():
                raise ValueError(f"--seeds_for: {item!r} must be topN_baselines with a number N")
        elif item not in entries:
            raise ValueError(f"--seeds_for: {item!r} is not one of --methods")


def _second_setting_flags() -> list[str]:
    extra = F.second_setting.split()
    for item in extra:
        name = item.lstrip("-").split("=", 1)[0]
        name = name[2:] if name.startswith("no") and name[2:] in {f.name for f in flag_fields(RunConfig)} else name
        if not item.startswith("--") or name not in {f.name for f in flag_fields(RunConfig)} - _NOT_PASSED:
            raise ValueError(f"--second_setting: {item!r} is not a run flag of experiments.run")
    return extra


RECORD = ("config.json", "metrics.jsonl", "summary.json")


def bring_finished(source: str, compare_dir: str) -> list[str]:
    """Copies each finished run's record under ``source`` (a folder with a summary.json) that
    ``compare_dir`` does not have finished into the same place under ``compare_dir``; returns
    their folders relative to it. A record is taken as it is, as a finished run in
    ``compare_dir`` is: it is not run again whatever the flags say now."""
    import shutil

    brought = []
    for folder, _, names in sorted(os.walk(source)):
        rel = os.path.relpath(folder, source)
        if "summary.json" not in names or os.path.isfile(os.path.join(compare_dir, rel, "summary.json")):
            continue
        os.makedirs(os.path.join(compare_dir, rel), exist_ok=True)
        for name in RECORD:  # the summary last: a copy cut short is not a finished run
            if name in names:
                shutil.copy2(os.path.join(folder, name), os.path.join(compare_dir, rel, name))
        brought.append(rel)
    if brought:
        print(f"compare: {len(brought)} finished runs' records from {source}", flush=True)
    return brought


def _unfinished(rows: list[dict]) -> bool:
    return any(r["status"] == "not run" or r["status"].startswith("failed") for r in rows)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        entries = list(dict.fromkeys(F.methods + F.second_methods))
        files = {m: method_flagfile(m, F.method_configs) for m in entries}
        algorithms = {m: entry_algorithm(m, F.method_configs) for m in entries}
        if not 0 < F.target_accuracy <= 1:
            raise ValueError(f"--target_accuracy must be in (0, 1], got {F.target_accuracy}")
        _check_seed_spec(F.seeds_for, F.methods)
        seeds = [str(int(s)) for s in F.seeds]
        second = _second_setting_flags()
        if F.second_methods and not second:
            raise ValueError("--second_methods needs --second_setting")
        if F.finished_runs and not os.path.isdir(F.finished_runs):
            raise ValueError(f"--finished_runs={F.finished_runs}: no such folder")
        unknown = [p for p in F.parts if p not in PARTS]
        if unknown or not F.parts:
            raise ValueError(f"--parts: {', '.join(unknown) or 'empty'}; allowed: {', '.join(PARTS)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    os.makedirs(F.compare_dir, exist_ok=True)
    if F.finished_runs:
        bring_finished(F.finished_runs, F.compare_dir)
    # Ctrl-C or a SIGTERM that reaches this process alone (a scheduler, `timeout`) stops the run
    # in progress with its rounds on disk (launch.call hands the signal on), then the comparison.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cli.stop_on_signals()
    try:
        _compare(files, algorithms, seeds, second)
    except KeyboardInterrupt as e:
        print(f"{cli.what(e)}: the finished runs are in {F.compare_dir}; run the same command again "
              "to continue", file=sys.stderr)
        sys.exit(cli.exit_code(e))
    finally:  # main may be called in-process (the tests do)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _compare(files: dict[str, str], algorithms: dict[str, str], seeds: list[str], second: list[str]) -> None:
    """The comparison's three parts and their tables (main, once its flags are checked)."""
    status = {}
    runs = lambda part: not F.report_only and part in F.parts  # noqa: E731
    checked = lambda part: F.report_only or part in F.parts  # noqa: E731 -- its rows set the exit status

    def passthrough(entry, extra=()):
        return [*shared_setting(algorithms[entry]), *extra, f"--flagfile={files[entry]}"]

    # (1) every entry once in the setting
    if runs("first"):
        for entry in F.methods:
            _run(entry, algorithms[entry], F.compare_dir, passthrough(entry), status)
    rows = report(F.methods, F.compare_dir, status, F.target_accuracy)
    first_rows = list(rows)
    # (2) the second setting
    second_rows, second_status = [], {}  # its own: an entry's name is the same in both settings
    folder = os.path.join(F.compare_dir, F.second_name)
    if second and F.second_methods:
        os.makedirs(folder, exist_ok=True)
        if runs("second"):
            for entry in F.second_methods:
                _run(entry, algorithms[entry], folder, passthrough(entry, second), second_status)
        second_rows = report(F.second_methods, folder, second_status, F.target_accuracy)
    # (3) the other seeds; topN_baselines is chosen from the finished first part only
    seed_rows = []
    if seeds and F.seeds_for:
        repeats, waiting = {}, _unfinished(first_rows) and any(map(_is_top, F.seeds_for))
        if waiting and runs("seeds"):
            print("compare: the strongest baselines' seeds wait until every --methods entry has "
                  "finished", flush=True)
        for entry in _seed_entries([i for i in F.seeds_for if not (waiting and _is_top(i))],
                                   first_rows, algorithms):
            repeats[entry] = [f"{entry}@seed{s}" for s in seeds]
            for s, name in zip(seeds, repeats[entry]):
                if runs("seeds"):
                    _run(name, algorithms[entry], F.compare_dir, passthrough(entry), status, seed=s)
        rows = report(F.methods, F.compare_dir, status, F.target_accuracy, repeats)
        seed_rows = [r for r in rows if r["method"] not in F.methods] + (
            [{"method": "top_baselines@seeds", "status": "not run"}] if waiting else [])
    print(open(os.path.join(F.compare_dir, "compare.md")).read())
    if second_rows:
        print(f"{F.second_name} ({' '.join(second)}):")
        print(open(os.path.join(folder, "compare.md")).read())
    # A diverged method is a result (reported in the table); a failed or missing one is not.
    if any(checked(part) and _unfinished(part_rows) for part, part_rows in
           (("first", first_rows), ("second", second_rows), ("seeds", seed_rows))):
        sys.exit(exit_codes.FAILED)


if __name__ == "__main__":
    app.run(main)
