"""The method comparison's table, one row per finished run read back from its workdir, and
the sweep table's columns.

Every figure comes from the run's own ``summary.json`` and ``metrics.jsonl``; nothing is
recomputed from settings. Besides every run's figures, the tables have a column for each field
some registered method declares (``MethodSpec.shows``), whichever methods a table holds, so
that its columns do not depend on them; a row holds its own method's.
"""

from __future__ import annotations

import json
import os

from fedmask_jax.algorithms import registry
from fedmask_jax.algorithms.shows import Shows, result_columns
from fedmask_jax.history import SIM_TIME
from fedmask_jax.plots import load_records


def table_columns(declared: list[Shows] | None = None) -> list[tuple[str, str, str]]:
    """(key, column header, format) of the comparison's Markdown table, in order: every run's
    figures and each coded uplink some method declares (``declared``: default, every
    registered method's)."""
    coded = _coded_uplinks(declared)
    return [
        ("method", "method", "{}"),
        ("final_test_accuracy", "final test acc", "{:.4f}"),
        ("best_test_accuracy", "best test acc", "{:.4f}"),
        ("mean_uplink_bpp", "uplink bits/param/client", "{:.4f}"),
        ("total_uplink_mb", "total uplink MB", "{:.2f}"),
        ("rounds_to_target", "rounds to target", "{}"),
        ("uplink_mb_to_target", "uplink MB to target", "{:.2f}"),
        ("sim_time_to_target_s", "simulated s to target", "{:.1f}"),
        *((c.bpp, c.header, "{:.4f}") for c in coded),
        ("steady_round_time_s", "s/round", "{:.2f}"),
    ]


def _coded_uplinks(declared: list[Shows] | None) -> list:
    """Each distinct coded uplink the methods declare (default: every registered method's)."""
    declared = registry.declarations() if declared is None else declared
    return list(dict.fromkeys(s.coded_uplink for s in declared if s.coded_uplink is not None))


def sweep_columns(declared: list[Shows] | None = None) -> list[str]:
    """The summary fields of experiments.sweep's table, in order (a sweep.json row holds these,
    ``status`` and its grid point)."""
    accuracy, uplink = result_columns(registry.declarations() if declared is None else declared)
    return ["final_test_accuracy", *accuracy, "mean_uplink_bpp", *uplink, "steady_round_time_s",
            "total_time_s", "diverged_at_round"]


def target_record(records: list[dict], target: float) -> dict:
    """The record of the first evaluated round whose test accuracy reaches ``target`` (its
    round, the uplink bits spent and the simulated seconds by then); {} when never reached."""
    for r in records:
        if r.get("test_accuracy", -1.0) >= target:
            return r
    return {}


def method_row(method: str, workdir: str, target: float) -> dict:
    """One comparison row from a finished run's workdir."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    records = load_records(workdir)
    reached = target_record(records, target)
    bits = reached.get("cumulative_uplink_bits")
    diverged = summary.get("diverged_at_round")
    row = {
        "method": method,
        "status": f"diverged at round {diverged}" if diverged else "done",
        "workdir": workdir,
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": max(r["test_accuracy"] for r in records),
        "diverged_at_round": diverged,
        "mean_uplink_bpp": summary["mean_uplink_bpp"],
        "total_uplink_mb": summary["total_uplink_bits"] / 8e6,
        "target_accuracy": target,
        "rounds_to_target": reached.get("round"),
        "uplink_mb_to_target": None if bits is None else bits / 8e6,
        "sim_time_to_target_s": reached.get(SIM_TIME),
        "sim_time_s": summary.get(SIM_TIME),
        "rounds": summary["rounds"],
        "num_params": summary["num_params"],
        "eval_split": summary.get("eval_split", "test"),
        "steady_round_time_s": summary["steady_round_time_s"],
    }
    shows = registry.shows_of(summary.get("algorithm"))  # the row keeps its method's declared figures
    for key in (*shows.accuracy_results(), *shows.uplink_results(),
                *(shows.coded_uplink.also if shows.coded_uplink else ())):
        if key in summary:
            row[key] = summary[key]
    return row


# A figure older runs' records do not hold (they were written before it was): the row field
# whose absence says so, so that such a cell reads "n/r" (not recorded), not "—" (not reached).
RECORDED_WITH = {"sim_time_to_target_s": "sim_time_s"}


def markdown_table(rows: list[dict]) -> str:
    table = table_columns()
    head = "| " + " | ".join(h for _, h, _ in table) + " | status |"
    lines = [head, "|" + "---|" * (len(table) + 1)]
    unrecorded = False
    for row in rows:
        cells = []
        for key, _, fmt in table:
            value, recorded_with = row.get(key), RECORDED_WITH.get(key)
            if value is None and recorded_with and "final_test_accuracy" in row and row.get(recorded_with) is None:
                unrecorded = True
                cells.append("n/r")
            else:
                cells.append("—" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + f" | {row['status']} |")
    if unrecorded:
        lines.append("\n— not reached or not the method's; n/r: not in that run's records (written before the field was)")
    return "\n".join(lines) + "\n"


def seeds_table(rows: list[dict], groups: dict[str, list[str]], declared: list[Shows] | None = None) -> str:
    """Mean ± standard deviation over each entry's finished seeds of its accuracies, uplink
    bits, coded uplink (a method that declares one) and cost to the target. The cost to the
    target averages the seeds that reached it; "k/n reached" says when some did not."""
    import statistics

    columns = [("final_test_accuracy", "final test acc", "{:.4f}"), ("best_test_accuracy", "best test acc", "{:.4f}"),
               ("mean_uplink_bpp", "uplink bits/param/client", "{:.4f}"),
               *((c.bpp, c.header, "{:.4f}") for c in _coded_uplinks(declared)),
               ("rounds_to_target", "rounds to target", "{:.1f}"), ("uplink_mb_to_target", "uplink MB to target", "{:.2f}")]

    def cell(done: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in done if r.get(key) is not None]
        if not values:
            return f"— (0/{len(done)} reached)" if key in TO_TARGET else "—"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        text = f"{fmt.format(statistics.fmean(values))} ± {fmt.format(std)}"
        return text if len(values) == len(done) or key not in TO_TARGET else f"{text} ({len(values)}/{len(done)} reached)"

    by = {r["method"]: r for r in rows}
    lines = ["| method | seeds | " + " | ".join(f"{h} (mean ± std)" for _, h, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for entry, names in groups.items():
        done = [by[n] for n in names if "final_test_accuracy" in by.get(n, {})]
        if done:
            lines.append(f"| {entry} | {len(done)} | " + " | ".join(cell(done, k, f) for k, _, f in columns) + " |")
    return "\n".join(lines) + "\n"


TO_TARGET = ("rounds_to_target", "uplink_mb_to_target")
