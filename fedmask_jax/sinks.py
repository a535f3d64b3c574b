"""Where a run's records go: one small interface, one class per destination.

The loop hands every finished round to every sink in order (``round``), and the summary at
the end (``close``); a sink never feeds back into the run. ``close`` may return fields to add
to the summary (e.g. the paths of the plots it drew); sinks are closed in the order given, so
the summary file is written last.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
from typing import TextIO

from fedmask_jax import outputs


class Sink:
    def open(self, header: list[str]) -> None:
        """The run is about to start (``header``: lines describing it)."""

    def round(self, record: dict, evaluated: bool) -> None:
        """One finished round, as a flat dict (``evaluated``: it has test metrics)."""

    def close(self, summary: dict | None) -> dict:
        """The run ended (``summary`` None when it failed); returns fields for the summary."""
        return {}


class MetricsJsonl(Sink):
    """<workdir>/metrics.jsonl: one JSON object per evaluated round, flushed line by line so a
    crash loses at most the line being written.

    ``keep_until=R`` keeps the existing records of rounds <= R (a resumed run) and drops the
    rest, including a half-written last line, rewriting the file atomically first.
    """

    def __init__(self, path: str, keep_until: int = 0):
        self.path = path
        kept = []
        if keep_until and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut short by a kill
                    if record.get("round", 0) <= keep_until:
                        kept.append(line if line.endswith("\n") else line + "\n")
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".jsonl")
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.chmod(tmp, outputs.FILE_MODE)
        os.replace(tmp, path)
        self._file = open(path, "a")

    def round(self, record: dict, evaluated: bool) -> None:
        if evaluated:
            self._file.write(json.dumps(outputs.finite_or_none(record), sort_keys=True,
                                        allow_nan=False) + "\n")
            self._file.flush()

    def close(self, summary):
        self._file.close()
        return {}


class TensorBoard(Sink):
    """Every numeric field of every round as a TensorBoard scalar (tensorboardX)."""

    def __init__(self, logdir: str, start_round: int = 0):
        from tensorboardX import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint.
        self._writer = SummaryWriter(logdir, purge_step=start_round + 1 if start_round else None)

    def round(self, record: dict, evaluated: bool) -> None:
        step = record["round"]
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self, summary):
        self._writer.close()
        return {}


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(record: dict, total_rounds: int, eta_s: float) -> str:
    """One round at a glance; the fields a method does not report are left out."""
    parts = [f"round {record['round']:>4}/{total_rounds}"]
    if "test_accuracy" in record:
        acc = f"acc {record['test_accuracy']:.4f}"
        if "test_accuracy_thresholded" in record:
            acc += f" (thr {record['test_accuracy_thresholded']:.4f})"
        parts += [acc, f"test loss {record['test_loss']:.3f}"]
    if "clients_dropped" in record or "clients_available" in record or not record.get("reported_clients", 1):
        text = f"clients {record.get('reported_clients', 0):.0f}"
        if "clients_available" in record:
            text += f" of {record['clients_available']} available"
        if "clients_dropped" in record:
            text += f" ({record['clients_dropped']} dropped, {record['clients_partial']} partial)"
        parts.append(text)
    if "train_loss" in record:
        parts += [f"train loss {record['train_loss']:.3f}", f"bpp {record['uplink_bpp']:.3f}"]
    if "uplink_bpp_coded_prior" in record:
        parts.append(f"coded {record['uplink_bpp_coded_global']:.3f}/{record['uplink_bpp_coded_prior']:.3f}")
    if "verified_clients" in record:
        parts.append(f"checked {record['verified_clients']}")
    if "mask_density" in record:
        parts.append(f"density {record['mask_density']:.3f}")
    if "epsilon" in record:
        parts.append(f"eps {record['epsilon']:.3g}")
    parts.append(f"{record['round_time_s']:.2f}s/round")
    if record.get("wall_time_s", 0) > 1.5 * record["round_time_s"] + 0.01:  # host-bound
        parts[-1] += f" ({record['wall_time_s']:.2f}s wall)"
    parts.append(f"ETA {format_eta(eta_s)}")
    return " | ".join(parts)


class Console(Sink):
    """The header, a line per round with an ETA, and the outcome."""

    def __init__(self, total_rounds: int, out: TextIO | None = None):
        self.total, self._out, self._times = total_rounds, out, []

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout  # whatever stdout is when a line is printed

    def open(self, header):
        for line in header:
            print(line, file=self.out, flush=True)

    def round(self, record, evaluated):
        self._times.append(record.get("wall_time_s", record["round_time_s"]))
        eta = statistics.median(self._times) * (self.total - record["round"])
        print(progress_line(record, self.total, eta), file=self.out, flush=True)

    def close(self, summary):
        if summary is None:
            return {}
        s = summary
        text = f"done: {s['algorithm']} test accuracy {s['final_test_accuracy']:.4f}"
        if "final_test_accuracy_thresholded" in s:
            text += f" (thresholded {s['final_test_accuracy_thresholded']:.4f})"
        text += f", mean uplink {s['mean_uplink_bpp']:.4f} bpp"
        if "final_model_bpp" in s:
            text += f", final model {s['final_model_bpp']:.4f} bpp"
        if "final_model_file_bpp" in s:
            text += f" (file {s['final_model_file_bpp']:.4f} bpp)"
        if "mean_uplink_bpp_coded_prior" in s:
            text += (f", coded uplink {s['mean_uplink_bpp_coded_global']:.4f} bpp global / "
                     f"{s['mean_uplink_bpp_coded_prior']:.4f} bpp with theta_g")
        if "mean_uplink_bpp_measured_prior" in s:
            text += f" (range coder: {s['mean_uplink_bpp_measured_prior']:.4f} on {s['verified_clients_total']} masks)"
        text += (f"; {s['total_time_s']:.1f}s total, {s['steady_round_time_s']:.2f}s/round; "
                 f"results in {s['workdir']}")
        print(text, file=self.out, flush=True)
        return {}


class Plots(Sink):
    """accuracy.png, loss.png and accuracy_vs_uplink.png, drawn from metrics.jsonl at the end."""

    def __init__(self, workdir: str):
        self.workdir = workdir

    def close(self, summary):
        if summary is None:
            return {}
        from fedmask_jax import plots

        return {"plots": plots.plot_runs([self.workdir], self.workdir)}


class SummaryFile(Sink):
    """<workdir>/summary.json, written atomically once the run has finished."""

    def __init__(self, path: str):
        self.path = path

    def close(self, summary):
        if summary is not None:
            outputs.write_json_atomic(self.path, summary)
        return {}


def default_sinks(workdir: str, total_rounds: int, start_round: int, *, verbose: bool,
                  tensorboard: bool, console: TextIO | None = None) -> list[Sink]:
    """What ``experiments.run`` writes: console (stdout, or ``console``), metrics.jsonl,
    TensorBoard, plots, summary."""
    sinks: list[Sink] = [Console(total_rounds, console)] if verbose else []
    sinks.append(MetricsJsonl(os.path.join(workdir, "metrics.jsonl"), keep_until=start_round))
    if tensorboard:
        sinks.append(TensorBoard(os.path.join(workdir, "tensorboard"), start_round))
    sinks += [Plots(workdir), SummaryFile(os.path.join(workdir, "summary.json"))]
    return sinks
