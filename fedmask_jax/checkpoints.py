"""Checkpoints of a run (orbax): the server state, every client's persistent state and the
history, so that a resumed run continues exactly where the checkpoint was taken."""

from __future__ import annotations

import os
import shutil

import jax

from fedmask_jax.history import History


class Checkpointer:
    """``<workdir>/checkpoints/<rounds done>/``, the last two kept.

    orbax writes into a temporary folder and renames it when complete, so a kill at any
    moment leaves the previous checkpoint intact.
    """

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

    def save(self, rounds_done: int, server, store, history: History) -> None:
        import orbax.checkpoint as ocp

        with self._manager() as mngr:
            mngr.save(rounds_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(self._device_state(server, store)),
                history=ocp.args.JsonSave(history.to_json())))
            mngr.wait_until_finished()

    def latest(self) -> int | None:
        if not os.path.isdir(self.folder):
            return None
        with self._manager() as mngr:
            return mngr.latest_step()

    def restore(self, step: int, server_like, store_like):
        """(server, store, history) of checkpoint ``step``, shaped like the templates."""
        import orbax.checkpoint as ocp

        with self._manager() as mngr:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(self._device_state(server_like, store_like)),
                history=ocp.args.JsonRestore()))
        state = restored.state
        server = state["server"]._replace(key=jax.random.wrap_key_data(state["server"].key))
        return server, state["store"], History.from_json(list(restored.history))
