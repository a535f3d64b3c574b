"""The round loop, in the shape of FedJAX's ``run_federated_experiment``: cohort -> round ->
record -> sinks, with evaluation and checkpoints on their cadence.

It knows nothing about methods. A method's host work comes in through its ``HostHook``s; a
hook may answer a round with a ``Future`` (work that overlaps the next round), so records
wait in ``_InOrder`` until complete and reach the history and the sinks in round order.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import jax

from fedmask_jax.algorithms.base import PyTree
from fedmask_jax.experiment import Experiment
from fedmask_jax.history import History, RoundRecord, finite
from fedmask_jax.sinks import Sink


@dataclasses.dataclass
class RunState:
    server: PyTree
    store: PyTree
    history: History


class _InOrder:
    """Records whose host work may still be running; each is completed, appended to the
    history and handed to the sinks in round order."""

    def __init__(self, history: History, sinks: Sequence[Sink]):
        self.history, self.sinks, self.waiting = history, sinks, []

    def add(self, record: RoundRecord, parts: list[dict | Future]) -> None:
        self.waiting.append((record, parts))

    def emit(self, keep: int = 0) -> None:
        """Emits the records at the head of the queue: all but the last ``keep`` (waiting for
        their host work if needed), then any that are already complete."""
        while self.waiting:
            record, parts = self.waiting[0]
            if len(self.waiting) <= keep and any(isinstance(p, Future) and not p.done() for p in parts):
                return
            for part in parts:  # a failed check raises here, after the rounds before it are out
                record.fields.update(part.result() if isinstance(part, Future) else part)
            self.waiting.pop(0)
            self.history.append(record)
            for sink in self.sinks:
                sink.round(record.flat(), record.evaluation is not None)


def run_rounds(exp: Experiment, state: RunState, sinks: Sequence[Sink], *,
               save: Callable[[RunState], None] | None = None) -> RunState:
    """Runs rounds ``state.history.rounds_done + 1 .. cfg.rounds`` (stopping early if the
    loss turns non-finite); ``save(state)`` is called every ``cfg.checkpoint_every`` rounds."""
    cfg, t_start = exp.cfg, time.perf_counter()
    t_last = t_start
    out = _InOrder(state.history, sinks)
    totals = state.history.totals()
    entries = exp.algorithm.num_params * cfg.clients_per_round
    for r in range(state.history.rounds_done, cfg.rounds):
        tickets = [hook.before_round(r, state.server) for hook in exp.hooks]
        t0 = time.perf_counter()
        result = exp.round_fn(state.server, state.store, exp.data, exp.cohort(r), exp.round_key(r))
        metrics = {k: float(v) for k, v in jax.device_get(result.metrics).items()}
        fields: dict[str, Any] = {"algorithm": cfg.algorithm, **metrics,
                                  "round_time_s": time.perf_counter() - t0}
        for key in [k for k in metrics if k.startswith("uplink_bpp")]:  # the whole cohort's bits
            total = "cumulative_uplink_bits" + key[len("uplink_bpp"):]
            fields[total] = totals[total] = totals.get(total, 0.0) + metrics[key] * entries
        parts = [hook.after_round(r, result, ticket) for hook, ticket in zip(exp.hooks, tickets)]
        state = RunState(result.server, result.store, state.history)
        diverged = not finite(metrics["train_loss"])  # the aggregate is poisoned: evaluate, stop
        evaluation = None
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds or diverged:
            t_eval = time.perf_counter()
            evaluation = exp.evaluate(state.server, r)
            fields.update(eval_time_s=time.perf_counter() - t_eval, elapsed_s=time.perf_counter() - t_start)
            diverged = diverged or not finite(evaluation["test_loss"])
        if diverged:
            fields["diverged"] = True
        # Wall time since the last round's record: the round, its evaluation and any wait for
        # the host's work on the rounds before it (round_time_s is the round alone).
        fields["wall_time_s"], t_last = time.perf_counter() - t_last, time.perf_counter()
        out.add(RoundRecord(r + 1, fields, evaluation), parts)
        out.emit(keep=1)  # host work may lag the rounds by one round, no more
        if save and cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.rounds):
            out.emit()
            save(state)
        if diverged:
            print(f"warning: {cfg.algorithm} diverged at round {r + 1} (non-finite loss); stopping the "
                  "run. Lower the learning rates (--client_lr, --server_lr).", file=sys.stderr, flush=True)
            break
    out.emit()
    return state
