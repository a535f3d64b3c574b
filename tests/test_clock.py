"""The simulated clock: a synchronous round lasts as long as its slowest reporting client's
latency, download, local work and upload; the round hands back each client's message size in
cohort order; every record carries the clock; bad network settings fail before any data is read."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments import cli
from fedmask_jax import engine, federation
from fedmask_jax.run_config import RunConfig
from fedmask_jax.simulation import run
from tests.helpers import digits_client_data, small_fedpm


def _three(tmp_path, **kw):
    """Three clients with speeds 1, 0.5 and 2, uplinks of 1, 2 and 0.5 Mbit/s, a 10 Mbit/s
    downlink and latencies 0.1, 0.2 and 0.3 s, all sampled every round."""
    traces = {"speeds": (1, 0.5, 2), "up": (1, 2, 0.5), "latency": (0.1, 0.2, 0.3)}
    for name, values in traces.items():
        (tmp_path / f"{name}.csv").write_text("".join(f"{v}\n" for v in values))
    cfg = RunConfig(num_clients=3, clients_per_round=3, batch_size=10, local_epochs=1,
                    local_work=f"csv:{tmp_path / 'speeds.csv'}", uplink_mbps=f"csv:{tmp_path / 'up.csv'}",
                    downlink_mbps="10", latency_s=f"csv:{tmp_path / 'latency.csv'}", **kw)
    return federation.build(cfg, np.full(3, 40))


UPLINK_BITS = np.array([1e6, 2e6, 1e6])  # each client's message
DOWNLINK_BITS = 3.2e6  # 0.32 s at 10 Mbit/s


def test_a_synchronous_round_lasts_as_long_as_its_slowest_reporting_client(tmp_path):
    # by hand: latency + download + local work (1 / speed) + upload
    #   client 0: 0.1 + 0.32 + 1   + 1e6 / 1e6   = 2.42
    #   client 1: 0.2 + 0.32 + 2   + 2e6 / 2e6   = 3.52   <- the slowest
    #   client 2: 0.3 + 0.32 + 0.5 + 1e6 / 0.5e6 = 3.12
    fed = _three(tmp_path, round_deadline=10.0)
    plan = fed.plan(0)
    assert plan.clients.tolist() == [0, 1, 2]
    assert fed.round_seconds(plan, UPLINK_BITS, DOWNLINK_BITS) == pytest.approx(3.52)
    # A deadline of 1.5 s: client 1 needs 2 s. Partial, it stops at 1.5 s and uploads:
    # 0.2 + 0.32 + 1.5 + 1 = 3.02, so client 2 is now the slowest.
    partial = _three(tmp_path, round_deadline=1.5, straggler_policy="partial")
    assert partial.round_seconds(partial.plan(0), UPLINK_BITS, DOWNLINK_BITS) == pytest.approx(3.12)
    # Dropped, it sends nothing, and the server waits out its deadline (0.2 + 0.32 + 1.5).
    drop = _three(tmp_path, round_deadline=1.5, straggler_policy="drop")
    plan = drop.plan(0)
    assert plan.valid.tolist() == [1, 0, 1]
    assert drop.round_seconds(plan, UPLINK_BITS, DOWNLINK_BITS) == pytest.approx(3.12)
    assert drop.round_seconds(plan, [1e6, 2e6, 0.0], DOWNLINK_BITS) == pytest.approx(2.42)
    assert drop.round_seconds(plan, [0.0, 0.0, 0.0], 0.0) == pytest.approx(0.2 + 1.5)


def test_without_a_network_a_round_lasts_its_slowest_clients_local_work(tmp_path):
    (tmp_path / "speeds.csv").write_text("1\n0.5\n2\n")
    fed = federation.build(RunConfig(num_clients=3, clients_per_round=3, round_deadline=10.0,
                                     local_work=f"csv:{tmp_path / 'speeds.csv'}"), np.full(3, 40))
    assert not fed.network.limited
    assert fed.round_seconds(fed.plan(0), [1e9] * 3, 1e9) == 2.0


def test_network_distributions_are_per_client_and_keyed_by_seed():
    cfg = RunConfig(num_clients=2000, clients_per_round=10, uplink_mbps="lognormal:0,0.5",
                    downlink_mbps="uniform:5,15", latency_s="uniform:0,0.2")
    net = federation.network(cfg)
    assert abs(np.median(np.log(net.uplink_bps / 1e6))) < 0.05
    assert net.downlink_bps.min() >= 5e6 and net.downlink_bps.max() <= 15e6
    assert net.latency_s.min() >= 0 and net.latency_s.max() <= 0.2
    same, other = federation.network(cfg), federation.network(dataclasses.replace(cfg, seed=1))
    np.testing.assert_array_equal(net.uplink_bps, same.uplink_bps)
    assert not np.array_equal(net.uplink_bps, other.uplink_bps)
    # the three draws are independent streams
    assert not np.allclose(np.argsort(net.downlink_bps), np.argsort(net.latency_s))


@pytest.mark.parametrize("settings, message", [
    (dict(uplink_mbps="0"), "--uplink_mbps='0' gives a client a value <= 0; it must be positive"),
    (dict(downlink_mbps="-10"), "--downlink_mbps='-10' gives a client a value <= 0"),
    (dict(uplink_mbps="uniform:0,1"), "--uplink_mbps=uniform:LOW,HIGH needs 0 < LOW <= HIGH"),
    (dict(uplink_mbps="fast"), "--uplink_mbps='fast' is unknown; use inf, a number"),
    (dict(latency_s="-0.1"), "--latency_s='-0.1' gives a client a value < 0; it must be zero or more"),
    (dict(latency_s="inf"), "--latency_s='inf' must be finite"),
    (dict(uplink_mbps="csv:/nonexistent.csv"), "--uplink_mbps: no such file"),
])
def test_bad_network_settings_fail_with_one_message(settings, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(**settings)


def test_a_bad_bandwidth_on_the_command_line_is_one_error_line(capsys, tmp_path):
    from absl import flags

    from experiments import run as run_cli

    (tmp_path / "up.csv").write_text("1\n2\n")  # 2 of the 4 clients
    flags.FLAGS.unparse_flags()
    try:
        cli.parse_flags(["prog", "--num_clients=4", "--clients_per_round=2", f"--uplink_mbps=csv:{tmp_path / 'up.csv'}",
                         f"--workdir={tmp_path / 'w'}"])
        with pytest.raises(SystemExit) as e:
            run_cli.main([])
    finally:
        flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err == f"error: --uplink_mbps: {tmp_path / 'up.csv'} gives no value for 2 of the 4 clients (first: client 2)\n"
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("chunk", [1, 2])
def test_the_round_hands_back_each_clients_message_in_cohort_order(chunk):
    alg, (data, _) = small_fedpm(), digits_client_data(6)
    cfg = engine.EngineConfig(batch_size=64, local_epochs=1, client_chunk_size=chunk,
                              per_client=("uplink_bpp", "uplink_bpp_coded_prior", "not_a_metric"))
    server = lambda: alg.server_init(jax.random.key(0))  # noqa: E731 -- a round donates its server
    outs = []
    for clients in ([4, 1, 2], [2, 4, 1]):
        cohort = engine.make_cohort(np.asarray(clients, np.int32), chunk, size=4, valid=np.array([1, 1, 0.0]))
        out = engine.make_round_fn(alg, cfg)(server(), engine.init_store(alg, 6), data, cohort, jax.random.key(3))
        outs.append({k: np.asarray(v) for k, v in out.per_client.items()})
        assert set(out.per_client) == {"uplink_bpp", "uplink_bpp_coded_prior"}  # the method has no other
        for key, values in out.per_client.items():
            assert values.shape == (4,) and values[2] == 0 and values[3] == 0  # not reporting, padding
            assert values[:2].mean() == pytest.approx(float(out.metrics[key]), rel=1e-6)
    first, second = outs
    for key in first:  # client 4, then 1; then client 4 at position 1, client 1 at position 2 (not reporting)
        assert first[key][0] == second[key][1] and len(set(first[key][:2])) == 2
    # Without per-client metrics the round hands back none.
    plain = engine.make_round_fn(alg, dataclasses.replace(cfg, per_client=()))
    cohort = engine.make_cohort(np.asarray([4, 1], np.int32), chunk)
    assert plain(server(), engine.init_store(alg, 6), data, cohort, jax.random.key(3)).per_client is None


TINY = RunConfig(dataset="digits", model="mlp", mlp_hidden=(32,), num_clients=6, clients_per_round=4,
                 rounds=3, local_epochs=1, batch_size=32, verbose=False, tensorboard=False, plots=False)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _values(record):
    return {k: v for k, v in record.items() if not any(t in k for t in ("time", "elapsed", "sim_"))}


@pytest.mark.slow
def test_every_record_carries_the_clock_and_the_slowest_clients_coded_message_sets_it(tmp_path):
    net = dict(uplink_mbps="0.01", downlink_mbps="1", latency_s="0.5")
    plain = run(dataclasses.replace(TINY, workdir=str(tmp_path / "plain")))
    timed = run(dataclasses.replace(TINY, workdir=str(tmp_path / "timed"), **net))
    dense = run(dataclasses.replace(TINY, workdir=str(tmp_path / "dense"), algorithm="fedavg", **net))
    plain_recs, timed_recs, dense_recs = (_records(str(tmp_path / d)) for d in ("plain", "timed", "dense"))
    # No network: every client does its full work in 1 s.
    assert [r["sim_round_s"] for r in plain_recs] == [1.0, 1.0, 1.0]
    assert [r["sim_time_s"] for r in plain_recs] == [1.0, 2.0, 3.0] and plain["sim_time_s"] == 3.0
    n = timed["num_params"]
    for a, b in zip(plain_recs, timed_recs):  # the network changes the clock, not the training
        assert _values(a) == _values(b)
        # FedPM's messages are theta_g-coded and differ per client: the slowest is above the mean
        base = 0.5 + 32 * n / 1e6 + 1.0
        assert b["sim_round_s"] > base + b["uplink_bpp_coded_prior"] * n / 1e4
        assert b["sim_round_s"] < base + b["uplink_bpp"] * n / 1e4
    for r in dense_recs:  # FedAvg's messages are all 32 bits a parameter
        assert r["sim_round_s"] == pytest.approx(0.5 + 32 * n / 1e6 + 1.0 + 32 * n / 1e4, rel=1e-12)
    assert timed_recs[-1]["sim_time_s"] == pytest.approx(sum(r["sim_round_s"] for r in timed_recs), rel=1e-12)
    assert dense["sim_time_s"] == pytest.approx(dense_recs[-1]["sim_time_s"])


@pytest.mark.slow
def test_a_round_every_client_dropped_from_still_counts_their_download(tmp_path):
    """Clients 1, 3, 5 and 7 (speed 0.5) miss the 1 s deadline and are dropped; with one client
    a round, a round of one of them reports no one. Its clients still downloaded the model, so
    the round lasts latency + download + deadline, and its record keeps downlink_bpp (the
    server's broadcast) while it has no client means."""
    (tmp_path / "speeds.csv").write_text("1\n0.5\n" * 4)
    cfg = RunConfig(dataset="digits", model="mlp", mlp_hidden=(32,), num_clients=8, clients_per_round=1, rounds=6,
                    local_epochs=1, batch_size=32, verbose=False, tensorboard=False, plots=False, algorithm="fedavg",
                    local_work=f"csv:{tmp_path / 'speeds.csv'}", straggler_policy="drop",
                    downlink_mbps="1", latency_s="0.1", workdir=str(tmp_path / "run"))
    summary = run(cfg)
    with open(os.path.join(summary["workdir"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    empty = [r for r in records if r["reported_clients"] == 0]
    assert empty and len(empty) < len(records), [r["reported_clients"] for r in records]
    download = 32 * summary["num_params"] / 1e6
    for r in empty:
        assert r["downlink_bpp"] == 32.0 and "train_loss" not in r and "uplink_bpp" not in r
        assert r["sim_round_s"] == pytest.approx(0.1 + download + 1.0, rel=1e-12)
    assert all(r["downlink_bpp"] == 32.0 for r in records)
