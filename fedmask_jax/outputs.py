"""Run outputs: per-round JSONL, summary JSON, console progress. Writes are atomic."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from typing import Any, TextIO


def finite_or_none(obj: Any) -> Any:
    """NaN and infinities -> None (JSON null), recursively: strict JSON that jq, pandas and
    browsers read, where Python's json would write the non-standard NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to a temp file in the same folder, then renames it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(finite_or_none(obj), f, indent=2, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_writable_dir(path: str, flag: str = "--workdir") -> str:
    """Creates ``path`` if needed and proves it is writable, or fails with one message."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag}={path} is not a writable folder ({e.strerror}); "
                         "choose another folder") from e
    return path


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so a crash loses at most it.

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
        os.replace(tmp, path)
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(finite_or_none(record), sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """Every numeric field of a round's record as a TensorBoard scalar (tensorboardX)."""

    def __init__(self, logdir: str, start_round: int = 0):
        from tensorboardX import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint.
        self._writer = SummaryWriter(logdir, purge_step=start_round + 1 if start_round else None)

    def write(self, record: dict) -> None:
        step = record["round"]
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(record: dict, total_rounds: int, eta_s: float, out: TextIO = sys.stdout) -> None:
    parts = [f"round {record['round']:>4}/{total_rounds}"]
    if "test_accuracy" in record:
        acc = f"acc {record['test_accuracy']:.4f}"
        if "test_accuracy_thresholded" in record:
            acc += f" (thr {record['test_accuracy_thresholded']:.4f})"
        parts.append(acc)
        parts.append(f"test loss {record['test_loss']:.3f}")
    parts.append(f"train loss {record['train_loss']:.3f}")
    parts.append(f"bpp {record['uplink_bpp']:.3f}")
    if "uplink_bpp_coded_prior" in record:
        parts.append(f"coded {record['uplink_bpp_coded_global']:.3f}/{record['uplink_bpp_coded_prior']:.3f}")
    if "mask_density" in record:
        parts.append(f"density {record['mask_density']:.3f}")
    parts.append(f"{record['round_time_s']:.2f}s/round")
    parts.append(f"ETA {format_eta(eta_s)}")
    print(" | ".join(parts), file=out, flush=True)
