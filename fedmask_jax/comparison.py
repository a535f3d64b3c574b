"""The method comparison's table: one row per finished run, read back from its workdir.

Every figure comes from the run's own ``summary.json`` and ``metrics.jsonl``; nothing is
recomputed from settings.
"""

from __future__ import annotations

import json
import os

from fedmask_jax.plots import load_records

# (key, column header, format) of the Markdown table, in order.
TABLE = [
    ("method", "method", "{}"),
    ("final_test_accuracy", "final test acc", "{:.4f}"),
    ("best_test_accuracy", "best test acc", "{:.4f}"),
    ("mean_uplink_bpp", "uplink bits/param/client", "{:.4f}"),
    ("total_uplink_mb", "total uplink MB", "{:.2f}"),
    ("rounds_to_target", "rounds to target", "{}"),
    ("uplink_mb_to_target", "uplink MB to target", "{:.2f}"),
    ("mean_uplink_bpp_coded_prior", "coded uplink bpp (θ_g prior)", "{:.4f}"),
    ("steady_round_time_s", "s/round", "{:.2f}"),
]


def rounds_to_target(records: list[dict], target: float) -> tuple[int | None, float | None]:
    """The first evaluated round whose test accuracy reaches ``target``, and the uplink bits
    spent by then (None when never reached)."""
    for r in records:
        if r.get("test_accuracy", -1.0) >= target:
            return r["round"], r.get("cumulative_uplink_bits")
    return None, None


def method_row(method: str, workdir: str, target: float) -> dict:
    """One comparison row from a finished run's workdir."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    records = load_records(workdir)
    reached, bits = rounds_to_target(records, target)
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
        "rounds_to_target": reached,
        "uplink_mb_to_target": None if bits is None else bits / 8e6,
        "rounds": summary["rounds"],
        "num_params": summary["num_params"],
        "eval_split": summary.get("eval_split", "test"),
        "steady_round_time_s": summary["steady_round_time_s"],
    }
    for key in ("final_test_accuracy_thresholded", "mean_uplink_bpp_coded_prior",
                "mean_uplink_bpp_coded_global", "final_model_file_bpp"):
        if key in summary:
            row[key] = summary[key]
    return row


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in TABLE) + " | status |"
    lines = [head, "|" + "---|" * (len(TABLE) + 1)]
    for row in rows:
        cells = []
        for key, _, fmt in TABLE:
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
