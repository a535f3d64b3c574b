"""Writing results safely: strict JSON, atomic replacement, a workdir proven writable."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any


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
