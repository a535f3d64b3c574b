"""FedPM and FedAvg on the quickstart setting under heterogeneous clients and under DP.

    python -m experiments.federation_results [--out=runs/federation] [--only=NAME,...]

Runs each setting below with ``experiments.run`` (one process each; a setting whose
``summary.json`` exists is skipped, so an interrupted batch resumes), then writes
``<out>/federation.md`` (a table per part) and ``<out>/federation_*.png`` (accuracy vs round).
docs/results.md shows what it printed.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments import exit_codes
from fedmask_jax import privacy

flags.DEFINE_string("out", "runs/federation", "Folder of the runs, the table and the plots.")
flags.DEFINE_list("only", [], "Run only these settings (names below); the report covers all that exist.")
F = flags.FLAGS

QUICKSTART = "experiments/configs/quickstart.flags"
FEDAVG = "experiments/configs/methods/fedavg.flags"
ROUNDS, CLIENTS, DELTA, MASK_ENTRIES = 20, 10, 1e-5, 266_610
# Heterogeneous work: speeds uniform in [0.2, 1], a deadline of 1.5 time units: clients slower
# than 2/3 straggle (4 of the 10 at seed 0, two of them finishing ~35% of their work).
HETERO = ["--local_work=uniform:0.2,1.0", "--round_deadline=1.5"]
DP_FEDAVG_CLIP = 1.0  # about the non-private run's update norms after round 1 (0.90-1.25)


def settings() -> dict[str, tuple[str, list[str]]]:
    """name -> (part, flags after the quickstart flagfile)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for method, extra in (("fedpm", []), ("fedavg", [f"--flagfile={FEDAVG}"])):
        out[f"{method}_full"] = ("hetero", extra)
        out[f"{method}_drop"] = ("hetero", extra + HETERO + ["--straggler_policy=drop"])
        out[f"{method}_partial"] = ("hetero", extra + HETERO + ["--straggler_policy=partial"])
    for eps in (1, 4, 8):
        z = privacy.noise_for_epsilon(eps, DELTA, ROUNDS, CLIENTS, CLIENTS)
        out[f"fedavg_dp_eps{eps}"] = ("dp", [f"--flagfile={FEDAVG}", f"--dp_clip={DP_FEDAVG_CLIP}",
                                             f"--dp_noise_multiplier={z:.6g}", f"--dp_delta={DELTA}"])
    for eps in (1, 4, 8):  # per mask entry: the usual way randomized response is quoted
        out[f"fedpm_rr_entry_eps{eps}"] = ("dp", [f"--mask_rr_epsilon={eps}", f"--dp_delta={DELTA}"])
    # ... and per entry such that the whole run's epsilon is 8.
    e = privacy.entry_epsilon_for(8.0, DELTA, ROUNDS, MASK_ENTRIES)
    out["fedpm_rr_total_eps8"] = ("dp", [f"--mask_rr_epsilon={e:.6g}", f"--dp_delta={DELTA}"])
    return out


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_all(todo: dict[str, tuple[str, list[str]]]) -> None:
    for name, (_, extra) in todo.items():
        workdir = os.path.join(F.out, name)
        if os.path.exists(os.path.join(workdir, "summary.json")):
            print(f"{name}: done already ({workdir})", flush=True)
            continue
        argv = [sys.executable, "-m", "experiments.run", f"--flagfile={QUICKSTART}", *extra,
                f"--workdir={workdir}", "--notensorboard"]
        print(f"{name}: {' '.join(argv[3:])}", flush=True)
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL)
        if proc.returncode not in (exit_codes.OK, exit_codes.DIVERGED):  # diverged: results kept
            print(f"error: {name} exited {proc.returncode}; see {workdir}", file=sys.stderr)
            sys.exit(proc.returncode)


def report(all_settings: dict[str, tuple[str, list[str]]]) -> str:
    rows = {"hetero": [], "dp": []}
    for name, (part, extra) in all_settings.items():
        workdir = os.path.join(F.out, name)
        if not os.path.exists(os.path.join(workdir, "summary.json")):
            continue
        recs = _records(workdir)
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        acc = [r["test_accuracy"] for r in recs if "test_accuracy" in r]
        row = {"name": name, "final": acc[-1], "best": max(acc), "flags": " ".join(e for e in extra if "flagfile" not in e)}
        if part == "hetero":
            row["dropped"] = sum(r.get("clients_dropped", 0) for r in recs) / len(recs)
            row["partial"] = sum(r.get("clients_partial", 0) for r in recs) / len(recs)
            row["reported"] = sum(r["reported_clients"] for r in recs) / len(recs)
        else:
            row["epsilon"] = summary.get("epsilon")
            row["per_entry"] = summary.get("epsilon_per_entry")
            row["z"] = summary.get("dp_noise_multiplier")
            diverged = summary.get("diverged_at_round")
            row["status"] = f"diverged at round {diverged}" if diverged else f"{len(recs)} rounds"
        rows[part].append((row, recs))
    lines = ["## Heterogeneous clients (quickstart setting, 20 rounds)", "",
             "| run | final acc | best acc | clients reporting / round | dropped / round | partial / round | flags |",
             "|---|---|---|---|---|---|---|"]
    for row, _ in rows["hetero"]:
        lines.append(f"| {row['name']} | {row['final']:.4f} | {row['best']:.4f} | {row['reported']:.1f} | "
                     f"{row['dropped']:.1f} | {row['partial']:.1f} | `{row['flags'] or 'defaults'}` |")
    lines += ["", f"## Differential privacy (quickstart setting, 20 rounds, delta {DELTA:g})", "",
              "| run | final acc | best acc | rounds | epsilon after them | per-entry epsilon | noise multiplier | flags |",
              "|---|---|---|---|---|---|---|---|"]
    for row, _ in rows["dp"]:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"| {row['name']} | {row['final']:.4f} | {row['best']:.4f} | {row['status']} | {fmt(row['epsilon'])} | "
                     f"{fmt(row['per_entry'])} | {fmt(row['z'])} | `{row['flags']}` |")
    _plot(rows)
    return "\n".join(lines) + "\n"


def _plot(rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = {row["name"]: recs for row, recs in rows["hetero"] if row["name"].endswith("_full")}
    for part, title in (("hetero", "Heterogeneous clients"), ("dp", "Differential privacy")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, method in zip(axes, ("fedpm", "fedavg")):
            series = [(row["name"], recs) for row, recs in rows[part] if row["name"].startswith(method + "_")]
            if part == "dp" and f"{method}_full" in full:
                series.insert(0, (f"{method}_full (no DP)", full[f"{method}_full"]))
            for name, recs in series:
                ev = [r for r in recs if "test_accuracy" in r]
                ax.plot([r["round"] for r in ev], [r["test_accuracy"] for r in ev], label=name)
            ax.set(title=f"{title}: {method}", xlabel="round", ylabel="test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(F.out, f"federation_{part}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(path)


def main(argv):
    del argv
    everything = settings()
    unknown = [n for n in F.only if n not in everything]
    if unknown:
        print(f"error: --only: unknown settings {unknown}; known: {', '.join(everything)}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    os.makedirs(F.out, exist_ok=True)
    run_all({n: s for n, s in everything.items() if not F.only or n in F.only})
    text = report(everything)
    with open(os.path.join(F.out, "federation.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
