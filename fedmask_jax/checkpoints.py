"""Checkpoints of a run (orbax): the server state, every client's persistent state and the
history, so that a resumed run continues exactly where the checkpoint was taken.

Each checkpoint carries an integrity record, ``integrity.json``: the SHA-256 of every file
orbax wrote, written last and atomically. A checkpoint restores only if its record is there
and every file matches it; otherwise the newest older checkpoint that does is used, and the
run says so. A kill at any moment leaves the previous checkpoint intact (orbax writes into a
temporary folder and renames it; the record comes after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax

from fedmask_jax import distributed, outputs
from fedmask_jax.history import History

INTEGRITY = "integrity.json"


class CheckpointError(ValueError):
    """No checkpoint of a workdir can be used; the message says why, per checkpoint."""


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
    """``<workdir>/checkpoints/<rounds done>/``, the last two kept."""

    def __init__(self, workdir: str):
        self.folder = os.path.join(workdir, "checkpoints")

    def _manager(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    @staticmethod
    def _device_state(server, store) -> dict:
        # Typed PRNG keys are stored as their raw key data.
        return {"server": server._replace(key=jax.random.key_data(server.key)), "store": store}

    def clear(self) -> None:
        """A fresh run replaces an old run's checkpoints."""
        if os.path.isdir(self.folder):
            shutil.rmtree(self.folder)

    def save(self, rounds_done: int, server, store, histories: list[History]) -> None:
        """The state after ``rounds_done`` rounds; ``histories``: each run's (one, or a
        batch's), the server and store with the batch's leading runs axis."""
        import orbax.checkpoint as ocp

        with self._manager() as mngr:
            mngr.save(rounds_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(self._device_state(server, store)),
                history=ocp.args.JsonSave({"runs": [h.to_json() for h in histories]})))
            mngr.wait_until_finished()
        # Several processes (jax.distributed): each saved through orbax, which writes every
        # value once; process 0 alone records the files and the others wait for the record.
        if distributed.is_primary():
            step_dir = os.path.join(self.folder, str(rounds_done))
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

    def restore_latest(self, server_like, store_like, runs: int = 1):
        """(step, server, store, histories, notes) of the newest checkpoint that verifies and
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
                            state=ocp.args.StandardRestore(self._device_state(server_like, store_like)),
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
                return step, server, state["store"], histories, notes
            notes.append(f"checkpoint {step}: {why}")
        if steps:
            raise CheckpointError(f"--resume: no usable checkpoint in {self.folder} ("
                                  + "; ".join(notes) + "); remove --resume to start afresh")
        return None
