"""Kill a run with SIGKILL mid-way, resume it, and get the metrics of an uninterrupted run."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedmask_jax.simulation import RunConfig, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--dataset=digits", "--model=mlp", "--mlp_hidden=16", "--num_clients=4",
         "--clients_per_round=3", "--rounds=30", "--local_epochs=1", "--batch_size=32",
         "--eval_every=2", "--checkpoint_every=2", "--persistent_client_optimizer"]


def _cli(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if not k.endswith("time_s") and k != "elapsed_s"} for line in f]


def _steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = _cli(*FLAGS, f"--workdir={killed}")
    deadline = time.time() + 240
    while time.time() < deadline and not (_steps(killed) and max(_steps(killed)) >= 4):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "summary.json")), "the run ended before the kill"

    resumed = _cli(*FLAGS, f"--workdir={killed}", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resume: continuing after round" in out
    uninterrupted = _cli(*FLAGS, f"--workdir={clean}")
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err

    a, b = _records(killed), _records(clean)
    assert [r["round"] for r in a] == list(range(2, 31, 2))
    assert a == b
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (killed, clean))
    assert sa["final_test_accuracy"] == sb["final_test_accuracy"]
    assert sa["mean_uplink_bpp_coded_prior"] == sb["mean_uplink_bpp_coded_prior"]


@pytest.mark.slow
def test_resume_refuses_different_flags_unless_told(tmp_path):
    cfg = RunConfig(dataset="digits", model="mlp", mlp_hidden=(16,), num_clients=4,
                    clients_per_round=2, rounds=2, local_epochs=1, batch_size=32,
                    checkpoint_every=1, verbose=False, workdir=str(tmp_path))
    run(cfg)
    changed = dataclasses.replace(cfg, method={"client_lr": 0.05}, resume=True, rounds=3)
    with pytest.raises(ValueError, match=r"--client_lr was 0\.1, now 0\.05"):
        run(changed)
    summary = run(dataclasses.replace(changed, allow_config_change=True))
    assert summary["rounds"] == 3
    assert [json.loads(l)["round"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_metrics_log_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    from fedmask_jax.sinks import MetricsJsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n{"round": 4, "test_acc')
    log = MetricsJsonl(str(path), keep_until=2)
    log.round({"round": 3, "x": 1}, evaluated=True)
    log.round({"round": 4, "x": 2}, evaluated=False)  # only evaluated rounds are written
    log.close(None)
    assert [json.loads(l) for l in path.read_text().splitlines()] == [
        {"round": 1}, {"round": 2}, {"round": 3, "x": 1}]


@pytest.mark.slow
def test_dense_method_with_client_memory_and_server_adam_resumes_exactly(tmp_path):
    """Top-k's per-client error memory and the server's Adam moments survive a checkpoint."""
    cfg = RunConfig(dataset="digits", model="mlp", mlp_hidden=(16,), num_clients=4,
                    clients_per_round=2, rounds=4, local_epochs=1, batch_size=32,
                    algorithm="topk", checkpoint_every=2, verbose=False, tensorboard=False,
                    method={"topk_fraction": 0.05, "server_optimizer": "adam", "server_lr": 0.01})
    clean = run(dataclasses.replace(cfg, workdir=str(tmp_path / "clean")))
    half = str(tmp_path / "half")
    run(dataclasses.replace(cfg, workdir=half, rounds=2))
    resumed = run(dataclasses.replace(cfg, workdir=half, resume=True, allow_config_change=True))
    assert _records(half) == _records(str(tmp_path / "clean"))
    assert resumed["final_test_loss"] == clean["final_test_loss"]
