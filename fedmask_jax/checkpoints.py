"""Checkpoints of a run (orbax): the server state, every client's persistent state and the
history, so that a resumed run continues exactly where the checkpoint was taken.

Each checkpoint carries the settings of the runs it holds, ``settings.json`` (what a resume
checks its flags against: config.json may be deleted or rewritten, the checkpoint's own record
goes with the state it describes), and an integrity record, ``integrity.json``: the SHA-256 of
every other file, written last and atomically. A checkpoint restores only if its record is there
and every file matches it; otherwise the newest older checkpoint that does is used, and the
run says so. A kill at any moment leaves the previous checkpoint intact (orbax writes into a
temporary folder and renames it; the record comes after).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading

import jax
import numpy as np

from fedmask_jax import distributed, outputs
from fedmask_jax.history import History

INTEGRITY = "integrity.json"
SETTINGS = "settings.json"


class CheckpointError(ValueError):
    """No checkpoint of a workdir can be used; the message says why, per checkpoint."""


def _out_of_space(e: BaseException) -> bool:
    text = str(e)
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text \
        or "os_error_code='28'" in text


class _ClosedLoopTracebacksDropped:
    """sys.stderr without the tracebacks of ``RuntimeError: Event loop is closed``.

    When one write of a save fails (a full disk), orbax closes the save's event loop while
    tensorstore's other writes are still in flight; each of them, finishing, tries to wake the
    closed loop and tensorstore prints that traceback, from its own threads, before and after
    the save's exception has reached the run, which says what happened in one line. A
    traceback is written a piece at a time, and another thread's line (the run's error line)
    can land between its pieces, so what may be a traceback is held per thread. Any other
    text, tracebacks included, goes through unchanged."""

    _HEADER = "Traceback (most recent call last):"

    def __init__(self, stream):
        self.stream = stream
        self._held: dict[int, str] = {}  # per thread: a traceback being written, until its last line says which
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            thread = threading.get_ident()
            held = self._held.pop(thread, "") + text
            out = []
            while held:
                at = held.find(self._HEADER)
                if at < 0:  # all goes through but what may be the beginning of a header
                    keep = next((k for k in range(min(len(self._HEADER) - 1, len(held)), 0, -1)
                                 if held.endswith(self._HEADER[:k])), 0)
                    out.append(held[:len(held) - keep])
                    held = held[len(held) - keep:]
                    break
                out.append(held[:at])
                held = held[at:]
                end = self._end_of_traceback(held)
                if end is None:
                    break
                block, held = held[:end], held[end:]
                if block.rstrip("\n").rsplit("\n", 1)[-1] != "RuntimeError: Event loop is closed":
                    out.append(block)
            if held:
                self._held[thread] = held
            if any(out):
                self.stream.write("".join(out))
        return len(text)

    def release(self):
        """What is held goes through; the stream it wraps is stderr again."""
        with self._lock:
            held, self._held = "".join(self._held.values()), {}
            if held:
                self.stream.write(held)
        return self.stream

    @classmethod
    def _end_of_traceback(cls, held: str) -> int | None:
        """Where the traceback at the start of ``held`` ends its exception line, or None if it
        is not all here."""
        at = len(cls._HEADER) + 1
        while True:
            nl = held.find("\n", at)
            if nl < 0:
                return None
            line = held[at:nl]
            if line and not line[0].isspace():
                return nl + 1
            at = nl + 1

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _closed_loop_tracebacks_dropped():
    """For a save; on a full disk it stays for the rest of the process (the run is ending and
    tensorstore's last writes may finish after the run has said why), unless stderr is not
    the process's own (a test capturing it)."""
    stream = sys.stderr
    sys.stderr = filtered = _ClosedLoopTracebacksDropped(stream)
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC or stream is not sys.__stderr__:
            sys.stderr = filtered.release()
        raise
    except BaseException:
        sys.stderr = filtered.release()
        raise
    else:
        sys.stderr = filtered.release()


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every failed write of a save, with its traceback, from each of its threads;
    the save's own exception says it once."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C or SIGTERM that arrives during a save is delivered once the save is over: raised
    inside it, the exception leaves orbax's writer threads failing, and logging it, while the
    process exits, and the checkpoint of the rounds just done would be lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    replaced = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):
            replaced[signum] = handler
            signal.signal(signum, lambda n, _: held.append(n))
    try:
        yield
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> dict[str, str]:
    """{path relative to ``folder``: SHA-256} of every file below it but the record."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != INTEGRITY:
                out[rel] = _digest(path)
    return out


class Checkpointer:
    """``<workdir>/checkpoints/<rounds done>/``, the last two kept; ``settings``: each run's
    ``RunConfig.record()``, saved with every checkpoint."""

    def __init__(self, workdir: str, settings: list[dict] | None = None):
        self.folder = os.path.join(workdir, "checkpoints")
        self.settings = settings
        self._problems: dict[int, str | None] = {}  # each step's verification, done once

    def _manager(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    @staticmethod
    def _device_state(server, store, buffer=None) -> dict:
        # Typed PRNG keys are stored as their raw key data.
        state = {"server": server._replace(key=jax.random.key_data(server.key)), "store": store}
        if buffer is not None:  # buffered aggregation's slots: contributions and their schedule
            state["buffer"] = {"values": buffer.values, "schedule": buffer.schedule._asdict()}
        return state

    def clear(self) -> None:
        """A fresh run replaces an old run's checkpoints."""
        self._problems.clear()
        if os.path.isdir(self.folder):
            shutil.rmtree(self.folder)

    def save(self, rounds_done: int, server, store, histories: list[History], buffer=None) -> None:
        """The state after ``rounds_done`` rounds; ``histories``: each run's (one, or a
        batch's), the server, store and buffered aggregation's ``buffer`` with the batch's
        leading runs axis."""
        with _signals_held(), _closed_loop_tracebacks_dropped():
            self._save(rounds_done, server, store, histories, buffer)

    def _save(self, rounds_done: int, server, store, histories: list[History], buffer=None) -> None:
        import orbax.checkpoint as ocp

        self._problems.pop(rounds_done, None)
        state, history = self._device_state(server, store, buffer), {"runs": [h.to_json() for h in histories]}
        try:
            with _quiet_orbax(), self._manager() as mngr:
                mngr.save(rounds_done, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))
                mngr.wait_until_finished()
        except Exception as e:
            if _out_of_space(e):  # tensorstore reports it as a ValueError of its own
                # The failed save's asyncio tasks each log the error again when collected,
                # after the run has said it once; the run is ending.
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint {rounds_done}",
                              self.folder) from None
            raise
        # Several processes (jax.distributed): each saved through orbax, which writes every
        # value once; process 0 alone records the files and the others wait for the record.
        if distributed.is_primary():
            step_dir = os.path.join(self.folder, str(rounds_done))
            if self.settings is not None:
                outputs.write_json_atomic(os.path.join(step_dir, SETTINGS), {"runs": self.settings})
            outputs.write_json_atomic(os.path.join(step_dir, INTEGRITY),
                                      {"rounds_done": rounds_done, "sha256": _files(step_dir)})
        distributed.barrier(f"fedmask_jax checkpoint {rounds_done}")

    def steps(self) -> list[int]:
        """The checkpoints on disk, newest first."""
        if not os.path.isdir(self.folder):
            return []
        return sorted((int(d) for d in os.listdir(self.folder) if d.isdigit()), reverse=True)

    def problem(self, step: int) -> str | None:
        """What is wrong with checkpoint ``step`` against its integrity record, or None."""
        if step not in self._problems:
            self._problems[step] = self._verify(step)
        return self._problems[step]

    def usable_step(self) -> int | None:
        """The newest checkpoint whose files match their integrity record (the one a resume
        tries first), or None."""
        return next((s for s in self.steps() if self.problem(s) is None), None)

    def recorded_settings(self, step: int) -> list[dict] | None:
        """Each run's settings as checkpoint ``step`` recorded them; None for a checkpoint
        made before checkpoints carried them."""
        try:
            with open(os.path.join(self.folder, str(step), SETTINGS)) as f:
                return list(json.load(f)["runs"])
        except FileNotFoundError:
            return None

    def _verify(self, step: int) -> str | None:
        step_dir = os.path.join(self.folder, str(step))
        try:
            with open(os.path.join(step_dir, INTEGRITY)) as f:
                record = json.load(f)
            expected = dict(record["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return "no readable integrity record (the save did not finish, or it was damaged)"
        found = _files(step_dir)
        missing = sorted(set(expected) - set(found))
        if missing:
            return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
        changed = sorted(k for k in expected if found[k] != expected[k])
        if changed:
            return f"{len(changed)} file(s) differ from their recorded SHA-256, e.g. {changed[0]}"
        extra = sorted(set(found) - set(expected))
        if extra:
            return f"{len(extra)} unexpected file(s), e.g. {extra[0]}"
        return None

    def restore_latest(self, server_like, store_like, runs: int = 1, buffer_like=None):
        """(step, server, store, buffer, histories, notes) of the newest checkpoint that verifies and
        restores with ``runs`` histories; ``notes`` says which newer ones were passed over
        and why. None when there is no checkpoint; ``CheckpointError`` when there are some
        and none can be used."""
        import orbax.checkpoint as ocp

        steps, notes = self.steps(), []
        for step in steps:
            why = self.problem(step)
            if why is None:
                try:
                    with self._manager() as mngr:
                        restored = mngr.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(self._device_state(server_like, store_like, buffer_like)),
                            history=ocp.args.JsonRestore()))
                    histories = [History.from_json(list(h)) for h in restored.history["runs"]]
                    if len(histories) != runs or max(h.rounds_done for h in histories) != step:
                        raise ValueError(f"it holds {len(histories)} run(s) ending at round "
                                         f"{max((h.rounds_done for h in histories), default=0)}")
                except Exception as e:  # noqa: BLE001 -- any failure means "not usable"
                    why = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            if why is None:
                state = restored.state
                server = state["server"]._replace(key=jax.random.wrap_key_data(state["server"].key))
                buffer = None
                if buffer_like is not None:
                    kept = state["buffer"]
                    buffer = buffer_like._replace(values=kept["values"], schedule=type(buffer_like.schedule)(
                        **{k: np.asarray(v) for k, v in kept["schedule"].items()}))
                return step, server, state["store"], buffer, histories, notes
            notes.append(f"checkpoint {step}: {why}")
        if steps:
            raise CheckpointError(f"--resume: no usable checkpoint in {self.folder} ("
                                  + "; ".join(notes) + "); remove --resume to start afresh")
        return None
