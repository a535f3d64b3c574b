"""The round loop against a fake program (nothing is compiled): records reach each track's
history and sinks in round order, hooks' late fields land on their own rounds, a diverged
track stops while the others go on, checkpoints and hooks' round limits are honoured."""

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from fedmask_jax import loop
from fedmask_jax.algorithms.base import HostHook
from fedmask_jax.experiment import Run
from fedmask_jax.history import History, RoundRecord
from fedmask_jax.run_config import RunConfig
from fedmask_jax.sinks import Sink

NUM_PARAMS = 100


class Output(NamedTuple):
    server: list
    store: list
    collected: list
    metrics: list
    contributions: None = None


class Plan(NamedTuple):
    fields: dict


class FakeProgram:
    """Each run's server state is the number of rounds it trained; ``losses[i](r)`` is run i's
    train loss in round r (0-based)."""

    num_params = NUM_PARAMS
    round_metrics = ("reported_clients",)

    def __init__(self, losses):
        self.losses, self.rounds, self.evaluated = losses, [], []

    def part(self, tree, i):
        return tree[i]

    def round_plan(self, r, buffer=None):
        return ("cohort", r), [Plan({"sampled_clients": 2}) for _ in self.losses]

    def round_seconds(self, plans, output, metrics):
        return [1.5 for _ in plans]

    def round(self, server, store, cohort, r, buffer=None, plans=None):
        assert cohort == ("cohort", r)
        self.rounds.append(r)
        metrics = [{"train_loss": loss(r), "uplink_bpp": 0.5, "reported_clients": 2.0} for loss in self.losses]
        return Output([s + 1 for s in server], store, [f"messages {i} {r}" for i in range(len(server))], metrics)

    def metrics(self, output):
        return output.metrics

    def evaluate(self, server, r):
        self.evaluated.append(r)
        return [{"test_accuracy": s / 10, "test_loss": 1.0} for s in server]


class Seen(Sink):
    def __init__(self):
        self.rows = []

    def round(self, record, evaluated):
        self.rows.append((record, evaluated))


def _track(hooks=(), rounds=4, eval_every=2, history=None, workdir="w"):
    cfg = RunConfig(rounds=rounds, eval_every=eval_every, workdir=workdir, verbose=False, tensorboard=False)
    return loop.Track(Run(cfg, None, [], None, None, list(hooks)), history or History(), [Seen()])


def _start(runs):
    return loop.State([0] * runs, None)


def test_records_reach_history_and_sinks_in_round_order():
    program, track = FakeProgram([lambda r: 1.0 / (r + 1)]), _track()
    state = loop.run_rounds(program, _start(1), [track])
    assert state.server == [4] and program.rounds == [0, 1, 2, 3]
    assert [r.round for r in track.history.records] == [1, 2, 3, 4]
    rows = track.sinks[0].rows
    assert [(row["round"], evaluated) for row, evaluated in rows] == [(1, False), (2, True), (3, False), (4, True)]
    assert rows[1][0]["test_accuracy"] == 0.2 and "test_accuracy" not in rows[0][0]
    assert [row["train_loss"] for row, _ in rows] == [1.0, 0.5, 1 / 3, 0.25]
    assert rows[0][0]["sampled_clients"] == 2 and rows[0][0]["algorithm"] == "fedpm"
    # The cohort's uplink bits add up over the rounds: bpp x entries x reporting clients.
    assert [row["cumulative_uplink_bits"] for row, _ in rows] == [100.0, 200.0, 300.0, 400.0]


class LateCheck(HostHook):
    """Answers each round with a Future; odd rounds finish after the round that follows."""

    def __init__(self):
        self.pool, self.seen, self.tickets = ThreadPoolExecutor(2), [], []

    def before_round(self, r, server):
        return ("ticket", r, server)

    def after_round(self, r, view, ticket):
        self.seen.append(view.collected)
        self.tickets.append(ticket)

        def check():
            time.sleep(0.05 if r % 2 == 0 else 0.0)
            return {"checked_round": r + 1}
        return self.pool.submit(check)


def test_a_future_hooks_fields_arrive_on_their_own_round_in_order():
    hook = LateCheck()
    track = _track([hook], rounds=5)
    loop.run_rounds(FakeProgram([lambda r: 1.0]), _start(1), [track])
    rows = [row for row, _ in track.sinks[0].rows]
    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["checked_round"] for row in rows] == [1, 2, 3, 4, 5]
    assert [r.fields["checked_round"] for r in track.history.records] == [1, 2, 3, 4, 5]
    # Each hook saw its own run's part: the server before the round, the round's messages.
    assert hook.tickets == [("ticket", r, r) for r in range(5)]
    assert hook.seen == [f"messages 0 {r}" for r in range(5)]


def test_a_diverged_track_stops_while_the_others_go_on(capsys):
    program = FakeProgram([lambda r: 1.0, lambda r: math.nan if r == 1 else 1.0, lambda r: 1.0])
    tracks = [_track(workdir=f"w{i}") for i in range(3)]
    loop.run_rounds(program, _start(3), tracks)
    assert [t.history.rounds_done for t in tracks] == [4, 2, 4]
    assert [t.live for t in tracks] == [True, False, True]
    assert tracks[1].history.diverged_at() == 2
    last = tracks[1].sinks[0].rows[-1]
    assert last[0]["diverged"] is True and last[1]  # evaluated when it diverged
    assert "diverged at round 2 (non-finite loss) in w1" in capsys.readouterr().err
    assert program.rounds == [0, 1, 2, 3]


def test_every_track_diverged_ends_the_loop():
    program = FakeProgram([lambda r: math.inf if r == 1 else 1.0] * 2)
    tracks = [_track(rounds=6) for _ in range(2)]
    loop.run_rounds(program, _start(2), tracks)
    assert program.rounds == [0, 1] and [t.history.rounds_done for t in tracks] == [2, 2]


def test_checkpoints_on_their_cadence_and_after_the_last_round():
    track, saved = _track(rounds=5), []

    def save(state):  # every record before the checkpoint is in the history it saves
        saved.append((state.server[0], track.history.rounds_done))

    loop.run_rounds(FakeProgram([lambda r: 1.0]), _start(1), [track], save=save, save_every=2)
    assert saved == [(2, 2), (4, 4), (5, 5)]
    assert loop.run_rounds(FakeProgram([lambda r: 1.0]), _start(1), [_track()], save=save) == loop.State([4], None)
    assert len(saved) == 3  # save_every=0: none


class Budget(HostHook):
    def __init__(self, rounds):
        self.rounds = rounds

    def rounds_limit(self):
        return self.rounds


def test_a_hooks_rounds_limit_stops_its_track_early():
    program = FakeProgram([lambda r: 1.0, lambda r: 1.0])
    tracks = [_track([Budget(3)], rounds=5, eval_every=10), _track([Budget(None)], rounds=5, eval_every=10)]
    loop.run_rounds(program, _start(2), tracks)
    assert [t.history.rounds_done for t in tracks] == [3, 5]
    # Each is evaluated after its own final round.
    assert [r.round for r in tracks[0].history.records if r.evaluation] == [3]
    assert [r.round for r in tracks[1].history.records if r.evaluation] == [5]
    alone = _track([Budget(2)], rounds=5)
    program = FakeProgram([lambda r: 1.0])
    loop.run_rounds(program, _start(1), [alone])
    assert program.rounds == [0, 1] and alone.history.rounds_done == 2


def test_a_restored_history_continues_its_rounds_and_totals():
    restored = History([RoundRecord(r, {"cumulative_uplink_bits": 100.0 * r}) for r in (1, 2)])
    track = _track(history=restored)
    program = FakeProgram([lambda r: 1.0])
    loop.run_rounds(program, loop.State([2], None), [track])
    assert program.rounds == [2, 3]
    assert [r.fields["cumulative_uplink_bits"] for r in track.history.records] == [100.0, 200.0, 300.0, 400.0]


def test_a_track_restored_diverged_records_nothing():
    program = FakeProgram([lambda r: 1.0])
    track = _track(history=History([RoundRecord(1, {"diverged": True})]))
    loop.run_rounds(program, loop.State([1], None), [track])
    assert program.rounds == [] and track.history.rounds_done == 1
