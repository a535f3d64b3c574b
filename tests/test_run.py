import dataclasses
import json
import os
import subprocess
import sys

import pytest

from fedmask_jax import coding
from fedmask_jax.algorithms.base import RunFault
from fedmask_jax.simulation import RunConfig, execute, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = RunConfig(dataset="digits", model="mlp", mlp_hidden=(64,), num_clients=6,
                 clients_per_round=4, rounds=4, local_epochs=2, batch_size=32, eval_every=2,
                 verbose=False)

RECORD_KEYS = {"round", "test_accuracy", "test_accuracy_thresholded", "test_loss",
               "uplink_bpp", "mask_density", "round_time_s"}
SUMMARY_KEYS = {"final_test_accuracy", "final_test_accuracy_thresholded", "mean_uplink_bpp",
                "final_model_bpp", "rounds", "clients_per_round", "num_clients", "dataset",
                "model", "seed", "total_time_s", "compile_time_s"}


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("time_s") and k != "elapsed_s"}
            for r in records]


@pytest.mark.slow
def test_run_writes_metrics_and_summary_and_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    summary = run(dataclasses.replace(TINY, workdir=a))
    run(dataclasses.replace(TINY, workdir=b))
    recs = _records(a)
    assert [r["round"] for r in recs] == [2, 4]  # every eval_every rounds, and the last
    assert all(RECORD_KEYS <= set(r) for r in recs)
    with open(os.path.join(a, "summary.json")) as f:
        on_disk = json.load(f)
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["final_test_accuracy"] == summary["final_test_accuracy"] == recs[-1]["test_accuracy"]
    assert summary["final_test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert 0 < summary["mean_uplink_bpp"] <= 1.01 and 0 < summary["final_model_bpp"] <= 1.01
    assert _without_times(recs) == _without_times(_records(b))


@pytest.mark.slow
def test_different_seed_differs(tmp_path):
    a = run(dataclasses.replace(TINY, workdir=str(tmp_path / "a"), rounds=2))
    b = run(dataclasses.replace(TINY, workdir=str(tmp_path / "b"), rounds=2, seed=1))
    assert a["final_test_loss"] != b["final_test_loss"]


@pytest.mark.parametrize("change,match", [
    ({"dataset": "imagenet"}, "--dataset"),
    ({"model": "resnet"}, "--model"),
    ({"clients_per_round": 7}, "--clients_per_round"),
    ({"rounds": 0}, "--rounds"),
    ({"rounds": -3}, "--rounds"),
    ({"split": "dirichlet", "dirichlet_alpha": 0.0}, "--dirichlet_alpha"),
    ({"batch_size": 5000}, "--batch_size"),
    ({"method": {"epsilon": 0.7}}, "--epsilon"),
    ({"eval_every": 0}, "--eval_every"),
    ({"width": float("nan")}, "--width must be a finite number"),
    ({"validation_fraction": float("nan")}, "--validation_fraction must be a finite number"),
    ({"method": {"client_lr": float("nan")}}, "--client_lr must be a finite number"),
    ({"method": {"lambda0": float("nan")}}, "--lambda0 must be a finite number"),
    ({"method": {"topk_fraction": 0.1}}, "--topk_fraction does not apply to --algorithm=fedpm"),
    ({"algorithm": "fedavg", "method": {"downlink": "quantized"}}, "--downlink does not apply"),
    ({"mlp_hidden": (64, 0)}, "--mlp_hidden must be >= 1"),
])
def test_bad_input_fails_before_compute_naming_the_flag(tmp_path, no_compiling, change, match):
    with pytest.raises(ValueError, match=match):
        run(dataclasses.replace(TINY, workdir=str(tmp_path / "w"), **change))


def test_unwritable_workdir(tmp_path, no_compiling):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--workdir"):
        run(dataclasses.replace(TINY, workdir=str(blocker / "run")))


def _cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_with_a_flagfile(tmp_path):
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("\n".join([
        "--dataset=digits", "--model=mlp", "--mlp_hidden=32", "--num_clients=4",
        "--clients_per_round=2", "--rounds=2", "--local_epochs=1", "--batch_size=32",
        f"--workdir={tmp_path / 'run'}"]))
    proc = _cli(f"--flagfile={flagfile}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "round    2/2" in proc.stdout and "done: fedpm test accuracy" in proc.stdout
    assert len(_records(str(tmp_path / "run"))) == 2


@pytest.mark.slow
def test_cli_bad_input_is_one_clear_message(tmp_path):
    proc = _cli("--dataset=digits", "--num_clients=3", "--clients_per_round=5",
                f"--workdir={tmp_path}", cwd=ROOT)
    assert proc.returncode == 2
    assert "error: --clients_per_round must be between 1 and --num_clients=3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_shipped_flagfile_parses_into_a_valid_config():
    from absl import flags

    from experiments import run as run_cli

    configs = os.path.join(ROOT, "experiments", "configs")
    names = sorted(f for f in os.listdir(configs) if f.endswith(".flags"))
    for required in ["quickstart", "mnist_conv4_iid", "emnist_conv4_iid", "cifar10_conv6_iid",
                     "cifar10_conv6_noniid2", "cifar10_conv6_noniid4", "cifar10_conv6_partial",
                     "cifar100_conv10_iid"]:
        assert f"{required}.flags" in names
    for name in names:
        if name.startswith(("bench", "compare")):  # other entry points' flagfiles
            continue
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", f"--flagfile={os.path.join(configs, name)}"])
        run_cli.config_from_flags()  # builds and checks the RunConfig
    flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_uplink_coding_is_checked_off_the_critical_path_and_changes_no_result(tmp_path):
    coded = run(dataclasses.replace(TINY, workdir=str(tmp_path / "c"), rounds=3, eval_every=1))
    plain = run(dataclasses.replace(TINY, workdir=str(tmp_path / "p"), rounds=3, eval_every=1,
                                    method={"coded_uplink": False}))
    recs, plain_recs = _records(str(tmp_path / "c")), _records(str(tmp_path / "p"))
    for r, p in zip(recs, plain_recs):
        # The device's ideal code lengths are there either way; the range coder checked all
        # 4 clients (fewer than the default 10), within what a range coder may take.
        for key in ("uplink_bpp_coded_global", "uplink_bpp_coded_prior", "downlink_bpp"):
            assert r[key] == p[key], key
        assert r["verified_clients"] == 4 and "verified_clients" not in p
        assert r["uplink_bpp_coded_prior"] < r["uplink_bpp_coded_global"]
        n = coded["num_params"]
        bound = coding.max_bits(r["uplink_bpp_coded_prior"] * n, n) / n
        assert r["uplink_bpp_coded_prior"] <= r["uplink_bpp_measured_prior"] <= bound
        assert r["downlink_bpp"] == 32.0
    # Aggregation never waits for or depends on the host's coding.
    assert _without_times(recs) != _without_times(plain_recs)  # the coded run has more fields
    for key in ("test_loss", "test_accuracy", "train_loss", "uplink_bpp", "mask_density"):
        assert [r[key] for r in recs] == [p[key] for p in plain_recs], key
    assert coded["verified_clients_total"] == 12 and "verified_clients_total" not in plain
    assert coded["mean_uplink_bpp_coded_prior"] < coded["mean_uplink_bpp_coded_global"]


@pytest.mark.slow
def test_a_mask_that_does_not_survive_coding_stops_the_run_keeping_earlier_rounds(tmp_path, monkeypatch):
    from fedmask_jax import coding
    from fedmask_jax.algorithms import fedpm_host

    real_decode, calls = coding.decode, []

    def corrupting_decode(words, probs, n):
        calls.append(1)
        out = real_decode(words, probs, n)
        if len(calls) == 11:  # round 2, its 2nd client (4 checked per round, 2 codes each)
            out = out.copy()
            out[0] ^= 1
        return out

    monkeypatch.setattr(coding, "decode", corrupting_decode)
    monkeypatch.setattr(fedpm_host, "coding_workers", lambda count: 1)  # in this process
    workdir = str(tmp_path / "w")
    with pytest.raises(RunFault, match="round 2: a client's uplink mask did not survive range coding"):
        run(dataclasses.replace(TINY, workdir=workdir, rounds=4, eval_every=1))
    assert [r["round"] for r in _records(workdir)] == [1]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.slow
@pytest.mark.parametrize("downlink,expect", [("quantized", 3.0), ("sampled_mask", None)])
def test_compressed_downlink(tmp_path, downlink, expect):
    outcome = execute(dataclasses.replace(TINY, workdir=str(tmp_path), rounds=2, eval_every=1,
                                          method={"downlink": downlink, "downlink_bits": 3}))
    summary = outcome.summary
    import numpy as np

    from fedmask_jax import models
    from fedmask_jax.algorithms import fedpm as fedpm_lib

    theta = models.flat(fedpm_lib.theta(outcome.server))
    if downlink == "quantized":
        assert len(np.unique(np.round(theta, 5))) <= 8
        assert summary["mean_downlink_bpp"] == expect
    else:
        assert np.allclose(np.minimum(np.abs(theta - 0.01), np.abs(theta - 0.99)), 0, atol=1e-6)
        assert 0 < summary["mean_downlink_bpp"] <= 1.01
    assert summary["final_test_accuracy"] > 0.2


@pytest.mark.slow
def test_run_writes_plots_config_record_and_overlay_cli(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    summary = run(dataclasses.replace(TINY, workdir=a, rounds=2, eval_every=1))
    run(dataclasses.replace(TINY, workdir=b, rounds=2, eval_every=1, seed=1))
    for name in ("accuracy.png", "loss.png", "accuracy_vs_uplink.png"):
        path = os.path.join(a, name)
        assert path in summary["plots"]
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(a, "config.json")) as f:
        record = json.load(f)
    assert record["config"]["seed"] == 0 and record["versions"]["jax"]
    recs = _records(a)
    assert recs[1]["cumulative_uplink_bits"] > recs[0]["cumulative_uplink_bits"] > 0
    assert 0 < recs[-1]["cumulative_uplink_bits_coded_prior"] < recs[-1]["cumulative_uplink_bits"]
    assert recs[1]["cumulative_uplink_bits"] == pytest.approx(  # the whole cohort's bits
        4 * summary["num_params"] * (recs[0]["uplink_bpp"] + recs[1]["uplink_bpp"]), rel=1e-6)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = str(tmp_path / "overlay")
    proc = subprocess.run([sys.executable, "-m", "experiments.plot", a, b, f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["accuracy.png", "accuracy_vs_uplink.png", "loss.png"]
    proc = subprocess.run([sys.executable, "-m", "experiments.plot", str(tmp_path / "nope")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "metrics.jsonl not found" in proc.stderr


def _read_events(folder):
    """Scalars from TFRecord-framed event files, parsed with tensorboardX's own protos."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


@pytest.mark.slow
def test_tensorboard_scalars_are_written(tmp_path):
    run(dataclasses.replace(TINY, workdir=str(tmp_path), rounds=2, eval_every=1))
    scalars = _read_events(str(tmp_path / "tensorboard"))
    recs = _records(str(tmp_path))
    assert [s for s, _ in scalars["test_accuracy"]] == [1, 2]
    assert [v for _, v in scalars["test_accuracy"]] == pytest.approx([r["test_accuracy"] for r in recs])
    assert {"uplink_bpp", "uplink_bpp_coded_prior", "train_loss", "downlink_bpp"} <= set(scalars)


@pytest.mark.slow
def test_conv_model_host_loop_and_scan_runs_agree_with_coded_uplink(tmp_path):
    base = dataclasses.replace(TINY, model="conv4", width=0.125, num_clients=3,
                               clients_per_round=2, rounds=2, eval_every=1,
                               max_examples_per_client=96)  # convs inside scan are slow on CPU
    a = run(dataclasses.replace(base, workdir=str(tmp_path / "h"), strategy="host_loop"))
    b = run(dataclasses.replace(base, workdir=str(tmp_path / "s"), strategy="scan"))
    assert a["strategy"] == "host_loop" and b["strategy"] == "scan"
    ra, rb = _records(str(tmp_path / "h")), _records(str(tmp_path / "s"))
    for x, y in zip(ra, rb):
        for key in ("test_loss", "train_loss", "uplink_bpp", "uplink_bpp_coded_prior"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), key


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_warning_and_strict_json(tmp_path, capsys):
    cfg = dataclasses.replace(TINY, workdir=str(tmp_path), algorithm="fedavg", method={"client_lr": 1e9},
                              rounds=5, eval_every=3, verbose=True, tensorboard=False)
    summary = run(cfg)
    assert summary["diverged_at_round"] == 1 and summary["rounds_completed"] == 1
    assert "diverged at round 1" in capsys.readouterr().err

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    lines = open(os.path.join(str(tmp_path), "metrics.jsonl")).read().splitlines()
    records = [json.loads(line, parse_constant=reject) for line in lines]
    assert [r["round"] for r in records] == [1]  # evaluated at once, not at round 3
    assert records[0]["train_loss"] is None and records[0]["test_accuracy"] <= 0.2
    on_disk = json.loads(open(os.path.join(str(tmp_path), "summary.json")).read(), parse_constant=reject)
    assert on_disk["diverged_at_round"] == 1


@pytest.mark.slow
def test_healthy_run_records_no_divergence(tmp_path):
    summary = run(dataclasses.replace(TINY, workdir=str(tmp_path), rounds=2))
    assert summary["diverged_at_round"] is None and summary["rounds_completed"] == 2
