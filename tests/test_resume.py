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
         "--eval_every=2", "--checkpoint_every=2", "--persistent_client_optimizer", "--noplots"]


def _cli(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        # wall-clock times differ; the simulated clock (sim_*) must go on where it stopped
        return [{k: v for k, v in json.loads(line).items()
                 if k.startswith("sim_") or not (k.endswith("time_s") or k == "elapsed_s")} for line in f]


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
    assert a == b and a[-1]["sim_time_s"] == 30.0
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


def _history(*rounds, evaluated=None):
    from fedmask_jax.history import History, RoundRecord

    evaluated = rounds if evaluated is None else evaluated
    return History([RoundRecord(r, {"x": r}, {"test_accuracy": r / 10} if r in evaluated else None)
                    for r in rounds])


def test_metrics_log_keeps_the_checkpoints_rows_and_drops_later_ones_and_a_torn_line(tmp_path):
    from fedmask_jax.sinks import MetricsJsonl

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"round": r, "test_accuracy": r / 10, "x": r}, sort_keys=True) for r in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"round": 4, "test_acc')
    log = MetricsJsonl(str(path), _history(1, 2))
    assert log.repaired is None  # the file agreed with the history: nothing to say
    log.round({"round": 3, "x": 1}, evaluated=True)
    log.round({"round": 4, "x": 2}, evaluated=False)  # only evaluated rounds are written
    log.close(None)
    assert path.read_text().splitlines() == [*rows[:2], '{"round": 3, "x": 1}']


@pytest.mark.parametrize("damage, note", [
    ("first row only", "rounds 2-3 missing"),
    ("garbage line 2", "round 2 missing; 1 unreadable line dropped"),
    ("a changed value", "round 2 differed"),
    ("a repeated row", "round 1 repeated"),
    ("no file", "rounds 1-3 missing"),
    ("a row the history did not evaluate", "round 2 not evaluated in it"),
])
def test_metrics_log_puts_back_every_row_of_the_checkpoints_history_and_says_which(tmp_path, damage, note):
    from fedmask_jax.sinks import MetricsJsonl

    path = tmp_path / "metrics.jsonl"
    history = _history(1, 2, 3, evaluated=(1, 3) if "did not evaluate" in damage else None)
    rows = [json.dumps(r.flat(), sort_keys=True) for r in history.records if r.evaluation is not None]
    found = {
        "first row only": lambda: rows[:1],
        "garbage line 2": lambda: [rows[0], "{not json", rows[2]],
        "a changed value": lambda: [rows[0], rows[1].replace('"x": 2', '"x": 5'), rows[2]],
        "a repeated row": lambda: [rows[0], rows[0], *rows[1:]],
        "no file": lambda: None,
        "a row the history did not evaluate": lambda: [rows[0], '{"round": 2, "x": 2}', rows[1]],
    }[damage]()
    if found is not None:
        path.write_text("\n".join(found) + "\n")
    log = MetricsJsonl(str(path), history)
    log.close(None)
    assert log.repaired == f"resume: rewrote metrics.jsonl from the checkpoint's history: {note}"
    assert path.read_text().splitlines() == rows  # every evaluated round once, as the history has it


@pytest.mark.slow
def test_dense_method_with_client_memory_and_server_adam_resumes_exactly(tmp_path):
    """Top-k's per-client error memory and the server's Adam moments survive a checkpoint."""
    cfg = RunConfig(dataset="digits", model="mlp", mlp_hidden=(16,), num_clients=4,
                    clients_per_round=2, rounds=4, local_epochs=1, batch_size=32,
                    algorithm="topk", checkpoint_every=2, verbose=False, tensorboard=False, plots=False,
                    method={"topk_fraction": 0.05, "server_optimizer": "adam", "server_lr": 0.01})
    clean = run(dataclasses.replace(cfg, workdir=str(tmp_path / "clean")))
    half = str(tmp_path / "half")
    run(dataclasses.replace(cfg, workdir=half, rounds=2))
    resumed = run(dataclasses.replace(cfg, workdir=half, resume=True, allow_config_change=True))
    assert _records(half) == _records(str(tmp_path / "clean"))
    assert resumed["final_test_loss"] == clean["final_test_loss"]
