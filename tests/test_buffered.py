"""Buffered asynchronous aggregation (FedBuff): the staleness weights, the event order on the
simulated clock (ties by client id), a storing round and its weighted aggregation against the
synchronous round, C = M = K against the synchronous run, same seed same run, and the
settings that cannot work."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import buffered, engine, experiment
from fedmask_jax.algorithms import registry
from fedmask_jax.run_config import RunConfig
from fedmask_jax.simulation import run
from tests.helpers import DIGITS_ARCH, digits_client_data, small_fedpm


def test_staleness_weights_are_the_formula():
    tau = np.array([0, 1, 2, 5, 10])
    np.testing.assert_array_equal(buffered.staleness_weights("constant", tau), np.ones(5))
    for a in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(buffered.staleness_weights(f"poly:{a}", tau), 1.0 / (1.0 + tau) ** a, rtol=1e-15)
    assert buffered.staleness_weights("poly:0", tau).tolist() == [1.0] * 5
    for bad in ("poly", "poly:-1", "poly:nan", "linear", "constant:2"):
        with pytest.raises(ValueError, match=f"--staleness={bad!r}"):
            buffered.check_staleness(bad)


def _schedule(ids, finish, version, updates):
    n = len(ids)
    return buffered.Schedule(np.array(ids), np.array(version), np.array(finish, np.float64),
                             np.zeros(n, bool), np.asarray(0.0), np.asarray(updates))


def test_an_update_takes_the_first_finishers_and_breaks_ties_by_client_id():
    s = _schedule(ids=[7, 4, 9, 2, 1], finish=[3.0, 1.0, 2.0, 1.0, 5.0], version=[0, 1, 2, 2, 0], updates=3)
    update, after = buffered.next_update(s, 2, "poly:1")
    # clients 2 and 4 both finish at 1.0; 2 goes first, and both are taken (slots 3 and 1)
    assert update.slots.tolist() == [1, 3] and update.time == 1.0
    assert update.staleness.tolist() == [2, 1]  # version 3 minus theirs, in slot order
    np.testing.assert_allclose(update.weights, [0, 1 / 3, 0, 1 / 2, 0])
    assert after.free.tolist() == [False, True, False, True, False] and float(after.clock) == 1.0
    assert int(after.updates) == 4
    # a tie at the cut: of three clients finishing together, the two lowest ids
    tie = _schedule(ids=[5, 3, 4], finish=[1.0, 1.0, 1.0], version=[0, 0, 0], updates=0)
    assert buffered.next_update(tie, 2, "constant")[0].slots.tolist() == [1, 2]
    # a freed slot is not taken again before it is refilled
    again, emptied = buffered.next_update(after, 2, "constant")
    assert again.slots.tolist() == [0, 2] and again.time == 3.0 and again.staleness.tolist() == [4, 2]
    # with nothing in flight the server keeps its version and the clock stands
    none, kept = buffered.next_update(buffered.next_update(emptied, 2, "constant")[1], 2, "constant")
    assert len(none.slots) == 0 and not none.weights.any() and int(kept.updates) == 6
    # a client dispatched now carries the current version
    refilled = buffered.dispatched(kept, np.array([1]), np.array([8]), np.array([0.5]))
    assert refilled.version[1] == 6 and refilled.finish[1] == float(kept.clock) + 0.5 and not refilled.free[1]


# Each strategy and each chunk size once, not crossed: each case compiles four round programs
# (docs/benchmarks.md, "The suite").
@pytest.mark.parametrize("strategy, chunk", [("scan", 2), ("host_loop", 1)])
def test_a_storing_round_and_its_aggregation_are_the_synchronous_round(strategy, chunk):
    """Weights of 1 on the cohort's slots give the synchronous round's server bit for bit;
    other weights give server_update of the weighted sum."""
    (data, _) = digits_client_data(6)
    fedavg = registry.build("fedavg", DIGITS_ARCH, registry.method_config("fedavg", server_lr=0.5))
    for alg in (small_fedpm(), fedavg):
        cfg = engine.EngineConfig(batch_size=64, local_epochs=1, client_chunk_size=chunk)
        cohort = engine.make_cohort(np.array([0, 2, 3, 5], np.int32), chunk)
        server = lambda: alg.server_init(jax.random.key(0))  # noqa: E731 -- a round donates its server
        sync = engine.make_round_fn(alg, cfg, strategy)(server(), engine.init_store(alg, 6), data, cohort,
                                                        jax.random.key(3))
        storing = engine.make_round_fn(alg, dataclasses.replace(cfg, store_contributions=True), strategy)
        slots = jnp.array([3, 0, 2, 1], jnp.int32)  # position p goes into slot slots[p]
        kept = engine.Contributions(engine.init_contributions(alg, server(), 4), slots)
        out = storing(server(), engine.init_store(alg, 6), data, cohort, jax.random.key(3), kept)
        for a, b in zip(jax.tree.leaves(out.metrics), jax.tree.leaves(sync.metrics)):
            assert float(a) == float(b)
        kept_values = jax.tree.map(np.asarray, out.contributions)
        # slot order 1, 3, 2, 0 holds positions 1, 3, 2, 0: a permutation of the sum's order,
        # so compare with a cohort whose positions are in slot order
        in_order = engine.Contributions(engine.init_contributions(alg, server(), 4), jnp.arange(4, dtype=jnp.int32))
        ordered = storing(server(), engine.init_store(alg, 6), data, cohort, jax.random.key(3), in_order)
        copy = lambda: jax.tree.map(lambda x: x.copy(), ordered.server)  # noqa: E731 -- aggregate donates it
        same = storing.aggregate(copy(), ordered.contributions, jnp.ones(4, jnp.float32), jnp.float32(4))
        assert all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(_plain(same)), jax.tree.leaves(_plain(sync.server))))
        for p, slot in enumerate(np.asarray(slots)):  # each position's contribution is in its slot
            for x, y in zip(jax.tree.leaves(kept_values), jax.tree.leaves(ordered.contributions)):
                np.testing.assert_array_equal(x[slot], np.asarray(y)[p])
        w = np.array([1.0, 0.5, 0.0, 0.25], np.float32)
        weighted = storing.aggregate(copy(), ordered.contributions, jnp.asarray(w), jnp.float32(3))
        total = jax.tree.map(lambda v: jnp.tensordot(jnp.asarray(w), v, axes=1), ordered.contributions)
        expected = alg.server_update(copy(), total, jnp.float32(3))
        for x, y in zip(jax.tree.leaves(_plain(weighted)), jax.tree.leaves(_plain(expected))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def _plain(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else x, tree)


BASE = RunConfig(dataset="digits", model="mlp", mlp_hidden=(32,), num_clients=8, clients_per_round=4, rounds=3,
                 local_epochs=1, batch_size=32, verbose=False, tensorboard=False, plots=False)


def _records(workdir, drop=("time", "elapsed")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k.startswith("sim_") or not any(t in k for t in drop)}
                for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedpm", "fedavg"])
def test_buffered_with_every_slot_in_every_update_and_equal_clients_is_the_synchronous_run(tmp_path, algorithm):
    net = dict(uplink_mbps="2", latency_s="0.1")  # FedPM's coded messages differ: the slowest sets the clock
    sync = _records(run(dataclasses.replace(BASE, algorithm=algorithm, workdir=str(tmp_path / "s"), **net))["workdir"])
    buf = _records(run(dataclasses.replace(BASE, algorithm=algorithm, workdir=str(tmp_path / "b"),
                                           aggregation="buffered", **net))["workdir"])
    assert len(sync) == len(buf) == 3
    for a, b in zip(sync, buf):
        assert b.pop("buffered_clients") == 4 and b.pop("staleness_mean") == 0 and b.pop("staleness_max") == 0
        assert a == b


@pytest.mark.slow
def test_a_buffered_round_without_refills_records_its_update_and_no_client_means(tmp_path):
    """Three of 20 clients are available on average (bernoulli:0.15), so some round has none
    free to refill: its record has no client means (no client trained in it) but still says
    what the server took from the buffer, and what a client downloads."""
    cfg = dataclasses.replace(BASE, num_clients=20, clients_per_round=2, rounds=4, aggregation="buffered",
                              concurrency=2, buffer_size=2, availability="bernoulli:0.15", algorithm="fedavg",
                              workdir=str(tmp_path / "run"))
    with open(os.path.join(run(cfg)["workdir"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    empty = [r for r in records if r["reported_clients"] == 0]
    assert empty and len(empty) < len(records), [r["reported_clients"] for r in records]
    for r in records:
        assert {"buffered_clients", "staleness_mean", "staleness_max", "sim_round_s"} <= set(r)
        assert r["downlink_bpp"] == 32.0
    for r in empty:
        assert "train_loss" not in r and "uplink_bpp" not in r and "update_norm" not in r
    assert any(r["buffered_clients"] > 0 for r in records)


@pytest.mark.slow
def test_the_clock_orders_the_updates_and_a_run_repeats_itself(tmp_path):
    """Six clients, all in flight (C = N), two per update; their full local work takes 1, 0.5,
    0.25, 2, 4 and 3 s. By hand:
      update 1: clients 2 (0.25) and 1 (0.5) -> t = 0.5; both refilled (only they are free),
                finishing at 0.75 and 1.0, from version 1;
      update 2: client 2 (0.75), then the tie at 1.0 of client 0 (version 0) and client 1
                (version 1): client 0 first -> t = 1.0, staleness 0 and 1;
      update 3: clients 1 (1.0, version 1) and 2 (1.25, version 2) -> t = 1.25, staleness 1 and 0."""
    trace = tmp_path / "speeds.csv"
    trace.write_text("1\n2\n4\n0.5\n0.25\n0.3333333333333333\n")
    cfg = dataclasses.replace(BASE, num_clients=6, clients_per_round=2, aggregation="buffered", concurrency=6,
                              buffer_size=2, local_work=f"csv:{trace}", staleness="poly:0.5", algorithm="fedavg")
    recs = _records(run(dataclasses.replace(cfg, workdir=str(tmp_path / "a")))["workdir"])
    assert [r["sim_time_s"] for r in recs] == pytest.approx([0.5, 1.0, 1.25], rel=1e-12)
    assert [r["staleness_mean"] for r in recs] == [0.0, 0.5, 0.5]
    assert [r["staleness_max"] for r in recs] == [0, 1, 1]
    again = _records(run(dataclasses.replace(cfg, workdir=str(tmp_path / "b")))["workdir"])
    assert again == recs
    other = _records(run(dataclasses.replace(cfg, seed=1, workdir=str(tmp_path / "c")))["workdir"])
    assert [r["train_loss"] for r in other] != [r["train_loss"] for r in recs]


@pytest.mark.parametrize("settings, message", [
    (dict(aggregation="buffered", concurrency=4, buffer_size=5), "--buffer_size=5 is more than the --concurrency=4"),
    (dict(aggregation="buffered", concurrency=11), "--concurrency=11 is more than the --num_clients=10"),
    (dict(aggregation="buffered", round_deadline=2.0), "--round_deadline and --straggler_policy do not apply"),
    (dict(aggregation="buffered", staleness="poly:x"), "--staleness='poly:x': poly:A needs a finite A >= 0"),
    (dict(buffer_size=2), r"--buffer_size=2 only apply to --aggregation=buffered \(this run is sync\)"),
    (dict(concurrency=3, staleness="poly:1"), "--concurrency=3, --staleness=poly:1 only apply to"),
])
def test_settings_that_cannot_work_fail_with_one_message(settings, message):
    with pytest.raises(ValueError, match="^" + message):
        RunConfig(num_clients=10, clients_per_round=4, **settings)


def test_a_concurrency_above_what_availability_leaves_and_dp_fail_before_compute():
    from fedmask_jax import federation

    cfg = RunConfig(num_clients=10, clients_per_round=2, aggregation="buffered", concurrency=8,
                    availability="bernoulli:0.5")
    with pytest.raises(ValueError, match=r"leaves on average 5.0 of the 10 clients available in some round, "
                                         r"fewer than --concurrency=8; lower --concurrency"):
        federation.build(cfg, np.full(10, 40))
    dp = dataclasses.replace(BASE, algorithm="fedavg", aggregation="buffered",
                             method={"dp_clip": 1.0, "dp_noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="DP-FedAvg .* needs --aggregation=sync"):
        experiment.build(dp)


@pytest.mark.slow
def test_a_buffered_run_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    """The slots' contributions and schedule are in the checkpoint: stopped after round 2
    and resumed, the run's records are the uninterrupted run's."""
    cfg = dataclasses.replace(BASE, num_clients=10, clients_per_round=3, rounds=4, aggregation="buffered",
                              concurrency=7, buffer_size=3, local_work="lognormal:0,0.7", uplink_mbps="0.05",
                              staleness="poly:1", checkpoint_every=1)
    straight = _records(run(dataclasses.replace(cfg, workdir=str(tmp_path / "s")))["workdir"])
    run(dataclasses.replace(cfg, rounds=2, workdir=str(tmp_path / "r")))
    resumed = _records(run(dataclasses.replace(cfg, workdir=str(tmp_path / "r"), resume=True))["workdir"])
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    assert max(r["staleness_max"] for r in straight) > 0  # the slots really carried over
    assert resumed == straight
