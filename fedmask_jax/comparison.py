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
    declared = registry.declarations() if declared is None else declared
    coded = dict.fromkeys(s.coded_uplink for s in declared if s.coded_uplink is not None)
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


def markdown_table(rows: list[dict]) -> str:
    table = table_columns()
    head = "| " + " | ".join(h for _, h, _ in table) + " | status |"
    lines = [head, "|" + "---|" * (len(table) + 1)]
    for row in rows:
        cells = []
        for key, _, fmt in table:
            value = row.get(key)
            cells.append("—" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + f" | {row['status']} |")
    return "\n".join(lines) + "\n"


def seeds_table(rows: list[dict], groups: dict[str, list[str]]) -> str:
    """Mean and standard deviation over each entry's seeds (finished runs only)."""
    import statistics

    by = {r["method"]: r for r in rows}
    lines = ["| method | seeds | final test acc (mean ± std) | best test acc (mean ± std) | uplink bits/param/client |",
             "|---|---|---|---|---|"]
    for entry, names in groups.items():
        done = [by[n] for n in names if "final_test_accuracy" in by.get(n, {})]
        if not done:
            continue
        stat = lambda k: (statistics.fmean(r[k] for r in done),  # noqa: E731
                          statistics.stdev(r[k] for r in done) if len(done) > 1 else 0.0)
        (fm, fs), (bm, bs) = stat("final_test_accuracy"), stat("best_test_accuracy")
        lines.append(f"| {entry} | {len(done)} | {fm:.4f} ± {fs:.4f} | {bm:.4f} ± {bs:.4f} | "
                     f"{statistics.fmean(r['mean_uplink_bpp'] for r in done):.4f} |")
    return "\n".join(lines) + "\n"
