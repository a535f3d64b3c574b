"""Writing results safely: strict JSON, atomic replacement, a workdir proven writable."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import tempfile
from typing import Any

# The process's umask, read once at import (os.umask can only be read by setting it): files
# written atomically get the mode a plain open() would give them, not mkstemp's 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


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
        os.chmod(tmp, FILE_MODE)
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


class WorkdirLock:
    """An exclusive lock on a workdir for the life of a run (``flock`` on ``.lock``).

    The kernel releases it when the process ends, however it ends, so a lock left by a
    crashed run is no lock at all; the file only says which process took it last.
    ``flag``/``holder`` say what the folder is to the user and who holds it; ``shared``
    locks exclude an exclusive one but not each other (the shards of one sweep); ``name``:
    another lock file in the folder.
    """

    NAME = ".lock"

    def __init__(self, workdir: str, flag: str = "--workdir", holder: str = "run", *,
                 shared: bool = False, name: str = NAME):
        self.workdir, self.path = workdir, os.path.join(workdir, name)
        self.flag, self.holder, self.shared = flag, holder, shared
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ValueError(f"{self.flag}={self.workdir} is in use by another {self.holder} ({holder}); "
                                 f"wait for it to finish or choose another {self.flag}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
