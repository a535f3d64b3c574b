"""The round loop, in the shape of FedJAX's ``run_federated_experiment``: plan -> round -> each
live track records, with evaluation and checkpoints on their cadence.

It knows nothing about methods. A method's host work comes in through its ``HostHook``s; a
hook may answer a round with a ``Future`` (work that overlaps the next round), so a track's
records wait until complete and reach its history and sinks in round order. A program holds
one or more runs (a sweep's batch); each has a ``Track`` -- its settings, hooks, history,
sinks, running totals and liveness -- and a run that diverges stops recording while the
others go on.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple, Sequence

from fedmask_jax.algorithms.base import PyTree
from fedmask_jax.experiment import Experiment, Run
from fedmask_jax.history import SIM_TIME, History, RoundRecord, finite
from fedmask_jax.sinks import Sink


class State(NamedTuple):
    """A program's state between rounds: every run's, on the runs axis (``Experiment.part``)."""

    server: PyTree
    store: PyTree
    buffer: Any = None  # buffered aggregation's slots (``experiment.Buffer``); None when synchronous


class RoundView(NamedTuple):
    """What a run's hooks see of a round: its collected messages and its metrics."""

    collected: Any
    metrics: dict[str, float]


@dataclasses.dataclass
class Track:
    """One run through the loop: what it is (``run``: settings, federation, hooks), what it
    has recorded (``history``, restored on resume) and where its records go (``sinks``)."""

    run: Run
    history: History = dataclasses.field(default_factory=History)
    sinks: Sequence[Sink] = ()
    totals: dict[str, float] = dataclasses.field(init=False)  # the running cumulative_* fields
    live: bool = dataclasses.field(init=False)  # False once it diverged
    last: int = dataclasses.field(init=False)  # its final round: --rounds, or less if a hook caps it
    waiting: list = dataclasses.field(init=False, default_factory=list)  # records awaiting host work

    def __post_init__(self):
        self.totals = self.history.totals()
        self.live = self.history.diverged_at() is None
        limits = [n for n in (h.rounds_limit() for h in self.run.hooks) if n is not None]
        self.last = min([self.run.cfg.rounds, *limits])

    @property
    def cfg(self):
        return self.run.cfg

    def records(self, round_index: int) -> bool:
        """Whether this track records round ``round_index`` (0-based)."""
        return self.live and round_index < self.last

    def add(self, record: RoundRecord, parts: list[dict | Future]) -> None:
        self.waiting.append((record, parts))

    def emit(self, keep: int = 0) -> None:
        """Hands on the records at the head of the queue: all but the last ``keep`` (waiting
        for their host work if needed), then any that are already complete."""
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


def run_rounds(exp: Experiment, state: State, tracks: Sequence[Track], *,
               save: Callable[[State], None] | None = None, save_every: int = 0) -> State:
    """Runs every track from the round after its history's last to its ``last`` (``tracks[i]``:
    run i of ``exp``), each stopping early if its loss turns non-finite; ``save(state)``
    every ``save_every`` rounds and after the final one."""
    t_start = t_last = time.perf_counter()
    start = max(t.history.rounds_done for t in tracks)
    end = max([t.last for t in tracks if t.live], default=start)
    for r in range(start, end):
        recording = [(i, t) for i, t in enumerate(tracks) if t.records(r)]
        tickets = {i: [h.before_round(r, exp.part(state.server, i)) for h in t.run.hooks] for i, t in recording}
        cohort, plans = exp.round_plan(r, state.buffer)
        t0 = time.perf_counter()
        result = exp.round(state.server, state.store, cohort, r, state.buffer, plans)
        metrics = exp.metrics(result)
        round_time = time.perf_counter() - t0
        sim_seconds = exp.round_seconds(plans, result, metrics)
        state = State(result.server, result.store, result.contributions)
        diverged = [not finite(m["train_loss"]) for m in metrics]  # the aggregate is poisoned
        due = [(r + 1) % t.cfg.eval_every == 0 or r + 1 == t.last for t in tracks]
        t_eval = time.perf_counter()
        evaluations = exp.evaluate(state.server, r) if any(due[i] or diverged[i] for i, _ in recording) else None
        eval_time = time.perf_counter() - t_eval
        for i, track in recording:
            fields = _round_fields(track, metrics[i], plans[i].fields, round_time, sim_seconds[i], exp.num_params,
                                   exp.round_metrics)
            view = RoundView(exp.part(result.collected, i), metrics[i])
            parts = [hook.after_round(r, view, ticket) for hook, ticket in zip(track.run.hooks, tickets[i])]
            evaluation = evaluations[i] if due[i] or diverged[i] else None
            if evaluation is not None:
                fields.update(eval_time_s=eval_time, elapsed_s=time.perf_counter() - t_start)
                diverged[i] = diverged[i] or not finite(evaluation["test_loss"])
            if diverged[i]:
                fields["diverged"], track.live = True, False
                print(f"warning: {track.cfg.algorithm} diverged at round {r + 1} (non-finite loss) in "
                      f"{track.cfg.workdir}; stopping it. Lower the learning rates (--client_lr, "
                      "--server_lr).", file=sys.stderr, flush=True)
            # Wall time since the last round's record: the round, its evaluation and any wait
            # for the host's work on the rounds before it (round_time_s is the round alone).
            fields["wall_time_s"] = time.perf_counter() - t_last
            track.add(RoundRecord(r + 1, fields, evaluation), parts)
            track.emit(keep=1)  # host work may lag the rounds by one round, no more
        t_last = time.perf_counter()
        if save and save_every and ((r + 1) % save_every == 0 or r + 1 == end):
            for track in tracks:
                track.emit()
            save(state)
        if not any(t.live for t in tracks):
            break
    for track in tracks:
        track.emit()
    return state


def _round_fields(track: Track, metrics: dict[str, float], plan_fields: dict[str, int], round_time: float,
                  sim_seconds: float, num_params: int, round_metrics: Sequence[str]) -> dict[str, Any]:
    """A round's record fields from its metrics: the client means, the federation's counts,
    the round on the simulated clock and the running totals of bits and simulated seconds
    (``track.totals`` goes on with them). ``round_metrics``: the metrics of the round itself,
    kept when no client reported."""
    reported = metrics["reported_clients"]
    # A round no client reported has no client means to record (their zeros are no mean), but
    # it still has what the round itself measured: what was downloaded, a buffered update.
    means = metrics if reported else {k: v for k, v in metrics.items() if k in round_metrics}
    fields: dict[str, Any] = {"algorithm": track.cfg.algorithm, **means, **plan_fields, "round_time_s": round_time,
                              "sim_round_s": sim_seconds}
    fields[SIM_TIME] = track.totals[SIM_TIME] = track.totals.get(SIM_TIME, 0.0) + sim_seconds
    entries = num_params * reported
    for key in [k for k in metrics if k.startswith("uplink_bpp")]:  # the whole cohort's bits
        total = "cumulative_uplink_bits" + key[len("uplink_bpp"):]
        fields[total] = track.totals[total] = track.totals.get(total, 0.0) + metrics[key] * entries
    return fields
