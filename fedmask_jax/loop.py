"""The round loop, in the shape of FedJAX's ``run_federated_experiment``: cohort -> round ->
record -> sinks, with evaluation and checkpoints on their cadence.

It knows nothing about methods. A method's host work comes in through its ``HostHook``s; a
hook may answer a round with a ``Future`` (work that overlaps the next round), so records
wait in ``_InOrder`` until complete and reach the history and the sinks in round order. An
experiment may hold several runs of one program (a sweep's batch): each has its own records,
hooks, sinks and history, and a run that diverges stops recording while the others go on.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple, Sequence

from fedmask_jax.algorithms.base import PyTree
from fedmask_jax.experiment import Experiment
from fedmask_jax.history import History, RoundRecord, finite
from fedmask_jax.sinks import Sink


@dataclasses.dataclass
class RunState:
    server: PyTree  # with a leading runs axis when the experiment holds several runs
    store: PyTree
    histories: list[History]

    @property
    def history(self) -> History:
        return self.histories[0]


class RoundView(NamedTuple):
    """What a run's hooks see of a round: its collected messages and its metrics."""

    collected: Any
    metrics: dict[str, float]


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


def run_rounds(exp: Experiment, state: RunState, sinks: Sequence[Sequence[Sink]], *,
               save: Callable[[RunState], None] | None = None) -> RunState:
    """Runs rounds ``rounds done + 1 .. cfg.rounds`` of every run (``sinks[i]``: run i's),
    each stopping early if its loss turns non-finite; ``save(state)`` every
    ``cfg.checkpoint_every`` rounds."""
    cfg, runs, t_start = exp.cfg, range(exp.runs), time.perf_counter()
    t_last = t_start
    outs = [_InOrder(h, s) for h, s in zip(state.histories, sinks)]
    totals = [h.totals() for h in state.histories]
    live = [h.diverged_at() is None for h in state.histories]
    limits = [h.rounds_limit() for hooks in exp.hooks for h in hooks]
    last = min([cfg.rounds, *(n for n in limits if n is not None)])
    for r in range(max(h.rounds_done for h in state.histories), last):
        tickets = [[h.before_round(r, exp.run_view(state.server, i)) for h in exp.hooks[i]] if live[i] else []
                   for i in runs]
        cohort, plan_fields = exp.round_plan(r)
        t0 = time.perf_counter()
        result = exp.round_fn(state.server, state.store, exp.data, cohort, exp.round_key(r))
        metrics = exp.metrics(result)
        round_time = time.perf_counter() - t0
        state = RunState(result.server, result.store, state.histories)
        diverged = [not finite(m["train_loss"]) for m in metrics]  # the aggregate is poisoned
        due = (r + 1) % cfg.eval_every == 0 or r + 1 == last
        t_eval = time.perf_counter()
        evaluations = exp.evaluate(state.server, r) if due or any(map(all, zip(live, diverged))) else None
        eval_time = time.perf_counter() - t_eval
        for i in (i for i in runs if live[i]):
            reported = metrics[i]["reported_clients"]
            # A round no client reported has no client means to record (the server kept its state).
            means = metrics[i] if reported else {"reported_clients": reported}
            fields: dict[str, Any] = {"algorithm": cfg.algorithm, **means, **plan_fields[i],
                                      "round_time_s": round_time}
            entries = exp.algorithm.num_params * reported
            for key in [k for k in metrics[i] if k.startswith("uplink_bpp")]:  # the whole cohort's bits
                total = "cumulative_uplink_bits" + key[len("uplink_bpp"):]
                fields[total] = totals[i][total] = totals[i].get(total, 0.0) + metrics[i][key] * entries
            view = RoundView(exp.run_view(result.collected, i), metrics[i])
            parts = [hook.after_round(r, view, ticket) for hook, ticket in zip(exp.hooks[i], tickets[i])]
            evaluation = evaluations[i] if due or diverged[i] else None
            if evaluation is not None:
                fields.update(eval_time_s=eval_time, elapsed_s=time.perf_counter() - t_start)
                diverged[i] = diverged[i] or not finite(evaluation["test_loss"])
            if diverged[i]:
                fields["diverged"], live[i] = True, False
                print(f"warning: {cfg.algorithm} diverged at round {r + 1} (non-finite loss) in "
                      f"{exp.cfgs[i].workdir}; stopping it. Lower the learning rates (--client_lr, "
                      "--server_lr).", file=sys.stderr, flush=True)
            # Wall time since the last round's record: the round, its evaluation and any wait
            # for the host's work on the rounds before it (round_time_s is the round alone).
            fields["wall_time_s"] = time.perf_counter() - t_last
            outs[i].add(RoundRecord(r + 1, fields, evaluation), parts)
            outs[i].emit(keep=1)  # host work may lag the rounds by one round, no more
        t_last = time.perf_counter()
        if save and cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == last):
            for out in outs:
                out.emit()
            save(state)
        if not any(live):
            break
    for out in outs:
        out.emit()
    return state
