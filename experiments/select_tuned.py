"""Picks a tuned hyperparameter from a finished one-parameter sweep on a validation split and
writes the method flagfile that uses it.

    python -m experiments.select_tuned --tuning_sweep=runs/tune_conv4_cpu/fedpm \
        --base_flagfile=experiments/configs/methods/fedpm.flags \
        --out_flagfile=experiments/configs/methods_conv4_cpu/fedpm.flags --sweep_command='<the sweep command>'

The rule, fixed before any result was seen (issue 22; as docs/results.md chose on the MLP):
among the points that finished without diverging, take the best final validation accuracy;
choose the smallest value whose final validation accuracy is within ``--select_tolerance`` (0.005:
half a point) of it. Smaller steps are preferred because a learning rate that wins at the
tuning's 10 rounds can still diverge over the comparison's 40 (as on the MLP).

Every point of the grid must have finished, on a validation split: otherwise nothing is
written, one ``error:`` line says why and the exit status is 2. The flagfile written includes
``--base_flagfile`` (so every other value stays the base's) and sets the chosen value after it;
its comments give the grid, each point's validation accuracy, the rule and the sweep command. It is rewritten only when its
text changes, so re-running on the same sweep leaves it as it is.

A best value at an end of the grid says only that the best may lie beyond it. With
``--extend_at_edge`` nothing is written then: the exit status is 6 (``exit_codes.WIDEN_GRID``)
and the last line of stdout is ``GRID <name>=<values>``, the grid with one more value past that end (the end's own step, to
one significant figure), for the caller to run and select again. Without it the flagfile
is written and its comments say the value is at the edge.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

from experiments import exit_codes

F = flags.FLAGS
flags.DEFINE_string("tuning_sweep", None, "A finished experiments.sweep folder (one grid parameter).")
flags.DEFINE_string("base_flagfile", None, "The method flagfile the tuned one includes.")
flags.DEFINE_string("out_flagfile", None, "The flagfile to write.")
flags.DEFINE_string("sweep_command", "", "The sweep command, quoted in the flagfile's comments.")
flags.DEFINE_float("select_tolerance", 0.005, "Choose the smallest value within this much validation "
                   "accuracy of the best.", lower_bound=0)
flags.DEFINE_bool("extend_at_edge", False, "When the best value is the grid's largest or smallest, "
                  "write nothing, exit 6 and print the grid one step wider (GRID <name>=<values>).")
flags.DEFINE_string("setting_note", "", "What the sweep ran on, for the comments (e.g. the setting flagfile).")


def load_points(sweep_dir: str) -> tuple[str, list[dict]]:
    """The grid parameter and one record per point: value, accuracy (None if it diverged),
    diverged_at_round, and the run's validation fraction, seed and rounds. A ValueError if the
    sweep is not one finished, one-parameter sweep on a validation split."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (has the sweep run?)")
    with open(path) as f:
        rows = json.load(f)
    from fedmask_jax.comparison import sweep_columns

    # the rest of a sweep.json row is the grid point
    names = sorted({k for r in rows for k in r} - {*sweep_columns(), "status"})
    if len(names) != 1 or not rows:
        raise ValueError(f"{path}: expected a sweep over one parameter, got {names or 'no rows'}")
    name = names[0]
    points = []
    for row in rows:
        value = row[name]
        summary_path = os.path.join(sweep_dir, f"{name}={value}".replace("/", "_"), "summary.json")
        if not os.path.isfile(summary_path):
            raise ValueError(f"{name}={value} has not finished ({row.get('status')}); run the sweep again")
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("eval_split") != "validation":
            raise ValueError(f"{summary_path}: evaluated on {summary.get('eval_split')!r}, not a "
                             "validation split (--validation_fraction)")
        acc, diverged = summary.get("final_test_accuracy"), summary.get("diverged_at_round")
        ok = diverged is None and acc is not None and math.isfinite(acc)
        points.append({"value": value, "accuracy": acc if ok else None, "diverged_at_round": diverged,
                       "validation_fraction": summary["config"]["validation_fraction"],
                       "seed": summary["config"]["seed"], "rounds": summary["rounds"]})
    if len({(p["validation_fraction"], p["seed"], p["rounds"]) for p in points}) != 1:
        raise ValueError(f"{sweep_dir}: the points differ in validation fraction, seed or rounds")
    return name, sorted(points, key=lambda p: float(p["value"]))


def choose(points: list[dict], tolerance: float) -> dict:
    """The smallest value whose accuracy is within ``tolerance`` of the best (ValueError when
    every point diverged)."""
    ok = [p for p in points if p["accuracy"] is not None]
    if not ok:
        raise ValueError("every point diverged; widen the grid downwards")
    best = max(p["accuracy"] for p in ok)
    return min((p for p in ok if p["accuracy"] >= best - tolerance), key=lambda p: float(p["value"]))


def edge(points: list[dict], chosen: dict, tolerance: float) -> str | None:
    """"largest" when the chosen value is the grid's largest, "smallest" when the smallest value
    is the best by more than ``tolerance`` (the rule prefers it within tolerance anyway), else None."""
    ok = [p for p in points if p["accuracy"] is not None]
    if len(points) < 2:
        return None
    if chosen is points[-1]:
        return "largest"
    if chosen is points[0] and all(p["accuracy"] < chosen["accuracy"] - tolerance for p in ok if p is not chosen):
        return "smallest"
    return None


def wider_grid(points: list[dict], side: str) -> list[str]:
    """The grid's values with one more past its ``side`` end, a step as wide (by ratio) as the
    end's own, to one significant figure."""
    values = [p["value"] for p in points]
    a, b = (float(values[-2]), float(values[-1])) if side == "largest" else (float(values[1]), float(values[0]))
    nxt = float(f"{b * b / a:.1g}")
    return values + [f"{nxt:g}"] if side == "largest" else [f"{nxt:g}"] + values


def _figure(p: dict) -> str:
    if p["accuracy"] is not None:
        return f"{p['accuracy']:.4f}"
    at = p["diverged_at_round"]
    return f"diverged at round {at}" if at is not None else "non-finite"


def flagfile_text(entry: str, name: str, points: list[dict], chosen: dict, base: str, tolerance: float,
                  sweep_dir: str, command: str, setting: str) -> str:
    first = points[0]
    lines = [
        f"# {entry}: {name} tuned on the CNN{f' ({setting})' if setting else ''} on a validation split",
        f"# ({first['validation_fraction']:g} of the training set held out, seed {first['seed']}, "
        f"{first['rounds']} rounds) over {{{', '.join(p['value'] for p in points)}}}:",
        f"# final validation accuracy {', '.join(_figure(p) for p in points)} -> {chosen['value']}.",
        f"# Rule, fixed before the sweep ran: the smallest value within {tolerance * 100:g} points of "
        "the best",
        "# validation accuracy (diverged points excluded). Every other value as the included file",
        "# (MLP-tuned, or the reference code's: see it). Written by experiments/select_tuned.py from",
        f"# {os.path.join(sweep_dir, 'sweep.json')}; the sweep:",
    ]
    side = edge(points, chosen, tolerance)
    if side:
        lines.insert(3, f"# The chosen value is the grid's {side}: the best may lie beyond it.")
    lines += [f"#   {command}"] if command else []
    lines += [f"--flagfile={base}", f"--{name}={chosen['value']}"]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    try:
        for flag in ("tuning_sweep", "base_flagfile", "out_flagfile"):
            if not F[flag].value:
                raise ValueError(f"--{flag} is required")
        if not os.path.isfile(F.base_flagfile):
            raise ValueError(f"--base_flagfile: {F.base_flagfile}: no such file")
        name, points = load_points(F.tuning_sweep)
        chosen = choose(points, F.select_tolerance)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    side = edge(points, chosen, F.select_tolerance)
    if side and F.extend_at_edge:
        grid = wider_grid(points, side)
        print(f"select_tuned: {name} over {', '.join(p['value'] for p in points)}: "
              f"{', '.join(_figure(p) for p in points)}: the best, {chosen['value']}, is the grid's {side}; "
              f"run the sweep again over {', '.join(grid)}", flush=True)
        print(f"GRID {name}={','.join(grid)}", flush=True)
        sys.exit(exit_codes.WIDEN_GRID)
    out = F.out_flagfile
    entry = os.path.basename(out)[:-len(".flags")] if out.endswith(".flags") else os.path.basename(out)
    text = flagfile_text(entry, name, points, chosen, F.base_flagfile, F.select_tolerance,
                         F.tuning_sweep, F.sweep_command, F.setting_note)
    old = open(F.out_flagfile).read() if os.path.isfile(F.out_flagfile) else None
    if old != text:
        os.makedirs(os.path.dirname(F.out_flagfile) or ".", exist_ok=True)
        tmp = F.out_flagfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, F.out_flagfile)
    print(f"select_tuned: {entry}: {name} over {', '.join(p['value'] for p in points)}: "
          f"{', '.join(_figure(p) for p in points)} -> {chosen['value']} "
          f"({'wrote' if old != text else 'unchanged'} {F.out_flagfile})", flush=True)


if __name__ == "__main__":
    app.run(main)
