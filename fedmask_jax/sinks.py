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
from fedmask_jax.algorithms.shows import Shows, fill
from fedmask_jax.history import History


class Sink:
    def open(self, header: list[str]) -> None:
        """The run is about to start (``header``: lines describing it)."""

    def round(self, record: dict, evaluated: bool) -> None:
        """One finished round, as a flat dict (``evaluated``: it has test metrics)."""

    def close(self, summary: dict | None) -> dict:
        """The run ended (``summary`` None when it failed); returns fields for the summary."""
        return {}


def _row(record: dict) -> str:
    """A record as its metrics.jsonl line: strict JSON, keys sorted."""
    return json.dumps(outputs.finite_or_none(record), sort_keys=True, allow_nan=False)


def _read_rows(path: str) -> tuple[list[tuple[int, str]], int]:
    """The (round, canonical line) rows of an existing metrics.jsonl and how many of its lines
    do not parse as a row, not counting a last line cut short by a kill."""
    if not os.path.exists(path):
        return [], 0
    with open(path) as f:
        lines = f.read().split("\n")
    rows, unreadable = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rows.append((int(record["round"]), _row(record)))
        except (ValueError, TypeError, KeyError):
            torn = i == len(lines) - 1  # no newline after it: the write a kill interrupted
            unreadable += not torn
    return rows, unreadable


def _repair_note(found: tuple[list[tuple[int, str]], int], expected: dict[int, str],
                 last_round: int) -> str | None:
    rows, unreadable = found
    seen: dict[int, list[str]] = {}
    for r, line in rows:
        if r <= last_round:
            seen.setdefault(r, []).append(line)
    missing = sorted(r for r in expected if r not in seen)
    differed = sorted(r for r in expected if r in seen and expected[r] not in seen[r])
    repeated = sorted(r for r in expected if len(seen.get(r, ())) > 1)
    stray = sorted(r for r in seen if r not in expected)
    parts = [f"{_rounds(rs)} {what}" for rs, what in ((missing, "missing"), (differed, "differed"),
                                                      (repeated, "repeated"),
                                                      (stray, "not evaluated in it")) if rs]
    if unreadable:
        parts.append(f"{unreadable} unreadable line{'s' if unreadable > 1 else ''} dropped")
    if not parts:
        return None
    return "resume: rewrote metrics.jsonl from the checkpoint's history: " + "; ".join(parts)


def _rounds(rounds: list[int]) -> str:
    """'round 3' or 'rounds 1-4, 7' (runs of consecutive rounds shortened)."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"round{'s' if len(rounds) > 1 else ''} {text}"


class MetricsJsonl(Sink):
    """<workdir>/metrics.jsonl: one JSON object per evaluated round, flushed line by line so a
    crash loses at most the line being written.

    ``history``: the rounds a resumed run restored from its checkpoint (empty for a fresh
    run). The file is first rewritten, atomically, to hold exactly one row per evaluated round
    of that history, each equal to the history's record: the plots and comparisons read this
    file, and a row lost or damaged since it was written would otherwise stay lost. Rows
    after the checkpoint (a killed run's, to be computed again) and a line cut short by a
    kill are dropped silently; ``repaired`` is one line saying which rows had to be put back
    or replaced (None when the file agreed with the history).
    """

    def __init__(self, path: str, history: History | None = None):
        self.path = path
        expected = {r.round: _row(r.flat()) for r in (history.records if history else ()) if r.evaluation is not None}
        resumed = history.rounds_done if history else 0
        self.repaired = _repair_note(_read_rows(path), expected, resumed) if resumed else None
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".jsonl")
        with os.fdopen(fd, "w") as f:
            f.writelines(line + "\n" for _, line in sorted(expected.items()))
        os.chmod(tmp, outputs.FILE_MODE)
        os.replace(tmp, path)
        self._file = open(path, "a")

    def round(self, record: dict, evaluated: bool) -> None:
        if evaluated:
            self._file.write(_row(record) + "\n")
            self._file.flush()

    def close(self, summary):
        self._file.close()
        return {}


def _summary_writer():
    """tensorboardX's SummaryWriter. Where PyTorch is installed and not yet imported,
    tensorboardX imports it only to accept torch tensors, which these sinks never pass: about
    1.4 s of every run's start. A None in sys.modules makes that import fail, which
    tensorboardX handles; the entry is removed at once, so torch imports normally later."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoard(Sink):
    """Every numeric field of every round as a TensorBoard scalar (tensorboardX)."""

    def __init__(self, logdir: str, start_round: int = 0):
        SummaryWriter = _summary_writer()
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


def format_seconds(seconds: float) -> str:
    """A span of the simulated clock: tenths of a second under a minute, then as an ETA."""
    return f"{seconds:.1f}s" if seconds < 60 else format_eta(seconds)


def progress_line(record: dict, total_rounds: int, eta_s: float, shows: Shows = Shows()) -> str:
    """One round at a glance: every run's fields, then those the method declares (``shows``);
    the fields a round does not report are left out."""
    parts = [f"round {record['round']:>4}/{total_rounds}"]
    if "test_accuracy" in record:
        acc = f"acc {record['test_accuracy']:.4f}"
        also = shows.accuracy_also
        if also and also.key in record:
            acc += f" ({also.console} {record[also.key]:.4f})"
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
    parts += [f"{c.label} {fill(c.format, record[c.key], record)}" for c in shows.columns if c.key in record]
    if "epsilon" in record:
        parts.append(f"eps {record['epsilon']:.3g}")
    if "sim_time_s" in record:
        parts.append(f"sim {format_seconds(record['sim_time_s'])}")
    parts.append(f"{record['round_time_s']:.2f}s/round")
    if record.get("wall_time_s", 0) > 1.5 * record["round_time_s"] + 0.01:  # host-bound
        parts[-1] += f" ({record['wall_time_s']:.2f}s wall)"
    parts.append(f"ETA {format_eta(eta_s)}")
    return " | ".join(parts)


def summary_line(summary: dict, shows: Shows = Shows()) -> str:
    """The outcome in one line: every run's figures, with the method's declared ones."""
    s = summary
    text = f"done: {s['algorithm']} test accuracy {s['final_test_accuracy']:.4f}"
    also = shows.accuracy_also
    if also and f"final_{also.key}" in s:
        text += f" ({also.summary} {s[f'final_{also.key}']:.4f})"
    text += f", mean uplink {s['mean_uplink_bpp']:.4f} bpp"
    text += "".join(fill(template, s[key], s) for key, template in shows.summary if key in s)
    if "sim_time_s" in s:
        text += f", {format_seconds(s['sim_time_s'])} simulated"
    return text + (f"; {s['total_time_s']:.1f}s total, {s['steady_round_time_s']:.2f}s/round; "
                   f"results in {s['workdir']}")


class Console(Sink):
    """The header, a line per round with an ETA, and the outcome (``shows``: the fields the
    run's method declares)."""

    def __init__(self, total_rounds: int, out: TextIO | None = None, notes: tuple[str, ...] = (),
                 shows: Shows = Shows()):
        self.total, self._out, self._times, self.notes, self.shows = total_rounds, out, [], notes, shows

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout  # whatever stdout is when a line is printed

    def open(self, header):
        for line in [*header, *self.notes]:
            print(line, file=self.out, flush=True)

    def round(self, record, evaluated):
        self._times.append(record.get("wall_time_s", record["round_time_s"]))
        eta = statistics.median(self._times) * (self.total - record["round"])
        print(progress_line(record, self.total, eta, self.shows), file=self.out, flush=True)

    def close(self, summary):
        if summary is not None:
            print(summary_line(summary, self.shows), file=self.out, flush=True)
        return {}


class Plots(Sink):
    """accuracy.png, loss.png and accuracy_vs_uplink.png, drawn from metrics.jsonl at the end."""

    def __init__(self, workdir: str, shows: Shows = Shows()):
        self.workdir, self.shows = workdir, shows

    def close(self, summary):
        if summary is None:
            return {}
        from fedmask_jax import plots

        return {"plots": plots.plot_runs([self.workdir], self.workdir, [self.shows])}


class SummaryFile(Sink):
    """<workdir>/summary.json, written atomically once the run has finished."""

    def __init__(self, path: str):
        self.path = path

    def close(self, summary):
        if summary is not None:
            outputs.write_json_atomic(self.path, summary)
        return {}


def default_sinks(workdir: str, total_rounds: int, history: History, *, verbose: bool,
                  tensorboard: bool, plots: bool = True, console: TextIO | None = None,
                  shows: Shows = Shows()) -> list[Sink]:
    """What ``experiments.run`` writes: console (stdout, or ``console``), metrics.jsonl,
    TensorBoard, plots, summary. ``history``: the rounds restored from a checkpoint;
    ``shows``: the fields the run's method declares (``MethodSpec.shows``)."""
    metrics = MetricsJsonl(os.path.join(workdir, "metrics.jsonl"), history)
    sinks: list[Sink] = ([Console(total_rounds, console, tuple(filter(None, [metrics.repaired])), shows)]
                         if verbose else [])
    sinks.append(metrics)
    if tensorboard:
        sinks.append(TensorBoard(os.path.join(workdir, "tensorboard"), history.rounds_done))
    if plots:
        sinks.append(Plots(workdir, shows))
    sinks.append(SummaryFile(os.path.join(workdir, "summary.json")))
    return sinks
