"""Several runs in one program (a leading runs axis) give each run the metrics it gives alone."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedmask_jax import experiment, sinks
from fedmask_jax.run_config import RunConfig
from fedmask_jax.simulation import execute_runs, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("test_accuracy", "test_loss", "train_loss", "uplink_bpp", "cumulative_uplink_bits")
MASK_KEYS = ("test_accuracy_thresholded", "mask_density", "uplink_bpp_coded_prior", "uplink_bpp_coded_global")

BASE = RunConfig(dataset="digits", mlp_hidden=(32,), num_clients=6, clients_per_round=4, rounds=2,
                 local_epochs=1, batch_size=32, verbose=False, tensorboard=False, plots=False)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _batch_vs_alone(tmp_path, cfgs, keys, batch_settings=({},)):
    """Each run alone, then all of them as one batch for each of ``batch_settings`` (changes to
    every run's config, e.g. how many are vmapped at once): each batch gives each run its own
    records and summary."""
    alone = []
    for i, c in enumerate(cfgs):
        summary = run(dataclasses.replace(c, workdir=str(tmp_path / f"a{i}")))
        assert summary["runs_in_program"] == 1
        alone.append((summary, _rows(tmp_path / f"a{i}")))
    for j, settings in enumerate(batch_settings):
        batch = [dataclasses.replace(c, workdir=str(tmp_path / f"b{j}_{i}"), **settings) for i, c in enumerate(cfgs)]
        summaries, exp, *_ = execute_runs(batch, batch_dir=str(tmp_path / f"batch{j}"))
        assert len(exp.runs) == len(cfgs) and exp.round_fn.runs == len(cfgs)
        assert exp.engine_config.runs_vectorized == (batch[0].runs_vectorized or len(cfgs))
        assert [s["runs_in_program"] for s in summaries] == [len(cfgs)] * len(cfgs)
        for i, c in enumerate(batch):
            a, b = alone[i][1], _rows(tmp_path / f"b{j}_{i}")
            assert len(a) == len(b) == c.rounds
            for ra, rb in zip(a, b):
                for k in keys:  # the same arithmetic, vmapped: equal to float32 rounding
                    assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (settings, i, ra["round"], k)
            assert summaries[i]["final_test_accuracy"] == pytest.approx(alone[i][0]["final_test_accuracy"], abs=1e-7)
            assert summaries[i]["seed"] == c.seed and summaries[i]["workdir"] == c.workdir
    # The runs really differ (a batch that ran run 0 thrice would match nothing above but run 0).
    assert len({round(rows[-1]["train_loss"], 7) for _, rows in alone}) == len(cfgs)


def test_fedpm_runs_in_one_program_match_each_alone(tmp_path):
    cfgs = [dataclasses.replace(BASE, seed=0, method={"client_lr": 0.05}),
            dataclasses.replace(BASE, seed=1, method={"client_lr": 0.2}),
            dataclasses.replace(BASE, seed=2, split="dirichlet",
                                method={"epsilon": 0.02, "lambda0": 2.0, "prior_reset_period": 2})]
    # all 3 vmapped; a vmapped pair, then the third
    _batch_vs_alone(tmp_path, cfgs, KEYS + MASK_KEYS, [{"runs_vectorized": 0}, {"runs_vectorized": 2}])


def test_dense_runs_in_one_program_match_each_alone(tmp_path):
    dense = dataclasses.replace(BASE, algorithm="fedavg", runs_vectorized=1)  # one after another
    cfgs = [dataclasses.replace(dense, seed=3, method={"client_lr": 0.05}),
            dataclasses.replace(dense, seed=4, method={"client_lr": 0.1, "server_lr": 0.5,
                                                      "server_momentum": 0.9})]
    _batch_vs_alone(tmp_path, cfgs, KEYS)


def test_heterogeneous_federations_in_one_program_match_each_alone(tmp_path):
    """Stragglers, drops, availability and networks differ per run only in the cohort's values
    and the host's clock (which reads each run's clients' messages from the one program)."""
    base = dataclasses.replace(BASE, rounds=3, local_epochs=2)
    cfgs = [dataclasses.replace(base, seed=0, local_work="uniform:0.3,1.0", straggler_policy="partial",
                                uplink_mbps="lognormal:-5,1", latency_s="uniform:0,0.1"),
            dataclasses.replace(base, seed=1, local_work="uniform:0.3,1.0", round_deadline=1.5,
                                straggler_policy="drop", availability="bernoulli:0.8", downlink_mbps="0.1"),
            dataclasses.replace(base, seed=2)]
    _batch_vs_alone(tmp_path, cfgs, KEYS + MASK_KEYS + ("reported_clients", "sim_round_s", "sim_time_s"))


def test_buffered_runs_in_one_program_match_each_alone(tmp_path):
    """Each run's slots and schedule ride on the runs axis: seeds, staleness and networks differ."""
    # FedAvg: a dense step takes FedBuff's sum of s(tau)-weighted updates over M, so each run's
    # own staleness weights show in its numbers.
    base = dataclasses.replace(BASE, algorithm="fedavg", num_clients=8, clients_per_round=2, rounds=3,
                               aggregation="buffered", concurrency=5, buffer_size=2, local_work="lognormal:0,0.7",
                               uplink_mbps="0.05")
    cfgs = [dataclasses.replace(base, seed=0, staleness="poly:2"),
            dataclasses.replace(base, seed=1, method={"client_lr": 0.2}, uplink_mbps="0.2", latency_s="0.1")]
    _batch_vs_alone(tmp_path, cfgs, KEYS + ("sim_round_s", "sim_time_s", "staleness_mean"))


def test_shape_key_groups_what_can_share_a_program():
    key = experiment.shape_key
    assert key(BASE) == key(dataclasses.replace(BASE, seed=5, workdir="x", method={"client_lr": 0.3,
                                                                                 "lambda0": 3.0}))
    assert key(BASE) == key(dataclasses.replace(BASE, split="noniid", classes_per_client=2))
    assert key(BASE) == key(dataclasses.replace(BASE, plots=True, tensorboard=True, verbose=True))  # outputs only
    for changed in ({"batch_size": 16}, {"clients_per_round": 3}, {"local_epochs": 2}, {"mlp_hidden": (16,)},
                    {"algorithm": "fedavg"}, {"method": {"verify_coded_clients": "2"}}):
        assert key(BASE) != key(dataclasses.replace(BASE, **changed)), changed
    # Tuning on a validation split drawn by seed: the evaluated data differs, so seeds don't share.
    tune = dataclasses.replace(BASE, validation_fraction=0.1)
    assert key(tune) != key(dataclasses.replace(tune, seed=1))


def test_runs_that_differ_in_shape_are_refused_before_building():
    with pytest.raises(ValueError, match="share every setting"):
        experiment.build([BASE, dataclasses.replace(BASE, batch_size=16)])


EIGHT_DEVICES = r"""
import dataclasses, json, sys
import jax
from fedmask_jax.run_config import RunConfig  # before the backend starts: it reserves its threads
assert len(jax.devices()) == 8, jax.devices()
from fedmask_jax.simulation import execute_runs, run
d = sys.argv[1]
base = RunConfig(dataset="digits", mlp_hidden=(32,), num_clients=8, clients_per_round=4, rounds=2,
                 local_epochs=1, batch_size=32, verbose=False, tensorboard=False, plots=False, client_chunk_size=1)
cfgs = [dataclasses.replace(base, algorithm="fedpm", seed=0, method={"client_lr": 0.05}),
        dataclasses.replace(base, algorithm="fedpm", seed=1, method={"client_lr": 0.2}),
        dataclasses.replace(base, algorithm="fedpm", seed=2, split="dirichlet"),
        dataclasses.replace(base, algorithm="fedpm", seed=3, method={"lambda0": 2.0})]
dense = [dataclasses.replace(base, algorithm="fedavg", seed=s, method={"client_lr": lr})
         for s, lr in ((0, 0.05), (1, 0.1))]
out = {}
for name, group in (("fedpm", cfgs), ("fedavg", dense)):
    batch = [dataclasses.replace(c, workdir=f"{d}/{name}_b{i}") for i, c in enumerate(group)]
    summaries, exp, *_ = execute_runs(batch, batch_dir=f"{d}/{name}_batch")
    out[name] = {"mesh": dict(exp.mesh.shape), "batch": [], "alone": []}
    for i, c in enumerate(group):
        out[name]["batch"].append([json.loads(l) for l in open(f"{d}/{name}_b{i}/metrics.jsonl")])
        if name == "fedpm" and i % 2:
            out[name]["alone"].append(None)  # runs 0 and 2 alone: two devices of the runs axis, two federations
            continue
        run(dataclasses.replace(c, num_devices=1, workdir=f"{d}/{name}_a{i}"))
        out[name]["alone"].append([json.loads(l) for l in open(f"{d}/{name}_a{i}/metrics.jsonl")])
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_runs_sharded_over_eight_devices_match_each_alone_on_one(tmp_path, devices_alone):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # 4 runs: 4 devices on runs x 2 on clients; 2 runs: 2 x 4.
    assert out["fedpm"]["mesh"] == {"runs": 4, "clients": 2}
    assert out["fedavg"]["mesh"] == {"runs": 2, "clients": 4}
    for name, keys in (("fedpm", KEYS + MASK_KEYS), ("fedavg", KEYS)):
        pairs = [(b, a) for b, a in zip(out[name]["batch"], out[name]["alone"]) if a is not None]
        assert len(pairs) == 2
        for batch, alone in pairs:
            assert len(batch) == len(alone) == 2
            for rb, ra in zip(batch, alone):
                for k in keys:  # psum over clients sums in another order than one device
                    assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (name, k)
        assert len({np.round(r[-1]["train_loss"], 6) for r in out[name]["batch"]}) == len(out[name]["batch"])


def test_a_batch_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    cfgs = [dataclasses.replace(BASE, seed=s, rounds=3, checkpoint_every=1, method={"client_lr": lr})
            for s, lr in ((0, 0.05), (1, 0.2))]
    straight = [dataclasses.replace(c, workdir=str(tmp_path / f"s{i}")) for i, c in enumerate(cfgs)]
    execute_runs(straight, batch_dir=str(tmp_path / "straight"))
    # Stopped after round 2 (as if killed), then resumed to round 3.
    stopped = [dataclasses.replace(c, rounds=2, workdir=str(tmp_path / f"r{i}")) for i, c in enumerate(cfgs)]
    execute_runs(stopped, batch_dir=str(tmp_path / "resumed"))
    resumed = [dataclasses.replace(c, resume=True) for c in (dataclasses.replace(s, rounds=3) for s in stopped)]
    seen = [Seen(), Seen()]
    summaries, *_ = execute_runs(resumed, batch_dir=str(tmp_path / "resumed"),
                                   extra_sinks=[(s,) for s in seen])
    for s in seen:  # it continued from the checkpoint: only round 3 was run
        assert any(line.startswith("resume: continuing after round 2") for line in s.header)
        assert s.rounds == [3]
    for i in range(2):
        a, b = _rows(tmp_path / f"s{i}"), _rows(tmp_path / f"r{i}")
        assert [r["round"] for r in b] == [1, 2, 3]
        for ra, rb in zip(a, b):
            for k in KEYS + MASK_KEYS:
                assert ra[k] == rb[k], (i, ra["round"], k)
        assert summaries[i]["rounds_completed"] == 3


class Seen(sinks.Sink):
    def __init__(self):
        self.header, self.rounds = [], []

    def open(self, header):
        self.header = header

    def round(self, record, evaluated):
        self.rounds.append(record["round"])
