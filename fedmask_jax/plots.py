"""PNG plots of one or several runs, read back from their workdirs (metrics.jsonl)."""

from __future__ import annotations

import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fedmask_jax.algorithms.shows import Shows  # noqa: E402
from fedmask_jax.history import SIM_TIME  # noqa: E402


def load_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fedmask_jax run folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


def run_shows(run_dir: str) -> Shows:
    """The fields a run's method declares (its config.json, written before the first round,
    names the method); a folder without one shows only the fields every run has."""
    from fedmask_jax.algorithms import registry

    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            name = json.load(f)["config"]["algorithm"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    return registry.shows_of(name)


def plot_runs(run_dirs: Sequence[str], out_dir: str, shows: Sequence[Shows] | None = None) -> list[str]:
    """Accuracy and loss vs round, accuracy vs cumulative uplink megabits; returns PNG paths.
    ``shows``: each run's declared fields (default: read from its folder, ``run_shows``)."""
    os.makedirs(out_dir, exist_ok=True)
    runs = [(_label(d), load_records(d)) for d in run_dirs]
    shows = list(shows) if shows is not None else [run_shows(d) for d in run_dirs]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, recs), shown in zip(runs, shows):
        r = [x["round"] for x in recs]
        # A second model the method evaluates is drawn only where it differs from the first
        # (in some of a method's runs the two are the same model).
        also = shown.accuracy_also
        if also is None or not any(x.get(also.key, x["test_accuracy"]) != x["test_accuracy"] for x in recs):
            ax.plot(r, [x["test_accuracy"] for x in recs], label=label)
            continue
        line, = ax.plot(r, [x["test_accuracy"] for x in recs], label=f"{label} ({also.first_curve})")
        ax.plot(r, [x[also.key] for x in recs], "--", color=line.get_color(),
                label=f"{label} ({also.curve})")
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, recs in runs:
        r = [x["round"] for x in recs]
        line, = ax.plot(r, [x["test_loss"] for x in recs], label=f"{label} test")
        trained = [x for x in recs if "train_loss" in x]  # a round no client reported has none
        ax.plot([x["round"] for x in trained], [x["train_loss"] for x in trained], ":", color=line.get_color(),
                label=f"{label} train")
    ax.set(xlabel="round", ylabel="cross-entropy", title="Loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, recs), shown in zip(runs, shows):
        coded = shown.coded_uplink is not None and shown.coded_uplink.bits in recs[0]
        key = shown.coded_uplink.bits if coded else "cumulative_uplink_bits"
        if key not in recs[0]:
            continue  # written before cumulative counts were recorded
        ax.plot([x[key] / 1e6 for x in recs], [x["test_accuracy"] for x in recs], marker=".",
                label=label + (" (coded)" if coded else " (ideal)"))
    ax.set(xlabel="cumulative uplink, all clients (Mbit)", ylabel="test accuracy",
           title="Accuracy vs communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "accuracy_vs_uplink.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparison(runs: Sequence[tuple[str, str]], out_dir: str,
                    target: float | None = None) -> list[str]:
    """One line per method: accuracy vs round, accuracy vs cumulative uplink (log scale, since
    the methods' messages differ by orders of magnitude), with a dashed line for the uplink as
    coded where the run's method declares one, and accuracy vs simulated time where every run
    recorded it. ``runs`` is (label, workdir)."""
    os.makedirs(out_dir, exist_ok=True)
    loaded = [(label, load_records(d), run_shows(d).coded_uplink) for label, d in runs]
    figures = [("compare_accuracy.png", "round", "round", "linear", 1, "Accuracy per round"),
               ("compare_accuracy_vs_uplink.png", "cumulative_uplink_bits",
                "cumulative uplink, all clients (Mbit, log scale)", "log", 1e6, "Accuracy vs uplink communication")]
    if loaded and all(recs and SIM_TIME in recs[0] for _, recs, _ in loaded):
        figures.append(("compare_accuracy_vs_sim_time.png", SIM_TIME, "simulated time (s)", "linear", 1,
                        "Accuracy vs simulated time"))
    paths = []
    for name, xkey, xlabel, xscale, scale, title in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        # Past matplotlib's 10 default colours a comparison's lines would share them.
        colours = plt.cm.tab20.colors if len(loaded) > 10 else [None] * len(loaded)
        for (label, recs, coded), colour in zip(loaded, colours):
            xs = [x[xkey] / scale for x in recs]
            line, = ax.plot(xs, [x["test_accuracy"] for x in recs],
                            marker="." if len(recs) < 60 else None, label=label, color=colour)
            if xkey == "cumulative_uplink_bits" and coded is not None and coded.bits in recs[0]:
                ax.plot([x[coded.bits] / 1e6 for x in recs],
                        [x["test_accuracy"] for x in recs], ls="--", color=line.get_color(),
                        label=f"{label} ({coded.curve})")
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:g}")
        ax.set(xlabel=xlabel, ylabel="test accuracy", xscale=xscale, title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        paths.append(_save(fig, out_dir, name))
    return paths


def seed_curves(workdirs: Sequence[str], xkey: str = "round") -> tuple[list[float], list[float], list[float]]:
    """(x, mean, std) of test accuracy over several seeds' runs, at the evaluated rounds all of
    them recorded (std 0 with one run); x is the first run's ``xkey`` there."""
    import statistics

    runs = [{r["round"]: r for r in load_records(d) if "test_accuracy" in r} for d in workdirs]
    rounds = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    xs, means, stds = [], [], []
    for k in rounds:
        accs = [r[k]["test_accuracy"] for r in runs]
        xs.append(runs[0][k][xkey])
        means.append(statistics.fmean(accs))
        stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
    return xs, means, stds


def plot_seeds(groups: dict[str, Sequence[str]], out_dir: str, target: float | None = None) -> list[str]:
    """Each entry's test accuracy over its seeds, mean with a ±1 std band, per round and per
    cumulative uplink (its first seed's bits: an entry's seeds send the same or nearly the same;
    dashed, the mean against the uplink as coded where the method declares one).
    ``groups`` is label -> the workdirs of its seeds."""
    os.makedirs(out_dir, exist_ok=True)
    figures = [("compare_seeds_accuracy.png", "round", "round", "linear", 1),
               ("compare_seeds_accuracy_vs_uplink.png", "cumulative_uplink_bits",
                "cumulative uplink, all clients (Mbit, log scale)", "log", 1e6)]
    paths = []
    for name, xkey, xlabel, xscale, scale in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, dirs in groups.items():
            xs, mean, std = seed_curves(dirs, xkey)
            xs = [x / scale for x in xs]
            line, = ax.plot(xs, mean, label=f"{label} ({len(dirs)} seeds)")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.25, lw=0)
            coded = run_shows(dirs[0]).coded_uplink
            if xkey == "cumulative_uplink_bits" and coded is not None and coded.bits in load_records(dirs[0])[0]:
                cx, cmean, _ = seed_curves(dirs, coded.bits)
                ax.plot([x / scale for x in cx], cmean, ls="--", color=line.get_color(), label=f"{label} ({coded.curve})")
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:g}")
        ax.set(xlabel=xlabel, ylabel="test accuracy (mean ± std over seeds)", xscale=xscale,
               title="Accuracy over seeds" + (" vs uplink communication" if xscale == "log" else " per round"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir, name))
    return paths
