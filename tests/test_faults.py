"""Runs that cannot go silently wrong: faults injected by hand, as a user would meet them."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fedmask_jax import outputs
from fedmask_jax.checkpoints import CheckpointError
from fedmask_jax.simulation import RunConfig, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = RunConfig(dataset="digits", mlp_hidden=(16,), num_clients=4, clients_per_round=3, rounds=4,
                 local_epochs=1, batch_size=32, eval_every=1, checkpoint_every=1, verbose=False,
                 tensorboard=False, method={"persistent_client_optimizer": True})


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s") and k != "elapsed_s"}
                for line in f]


def _biggest_state_file(workdir, step):
    folder = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns]
    return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def clean_six(tmp_path_factory):
    """An uninterrupted 6-round run: what every resumed run below must reproduce."""
    workdir = str(tmp_path_factory.mktemp("clean"))
    run(dataclasses.replace(TINY, workdir=workdir, rounds=6))
    return _records(workdir)


def _four_then_damage(tmp_path, damage):
    workdir = str(tmp_path / "w")
    run(dataclasses.replace(TINY, workdir=workdir))  # checkpoints 3 and 4 are kept
    path = _biggest_state_file(workdir, 4)
    if damage == "flip":
        blob = bytearray(open(path, "rb").read())
        at = len(blob) // 2
        blob[at:at + 64] = bytes(b ^ 0xFF for b in blob[at:at + 64])
        open(path, "wb").write(bytes(blob))
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "delete_file":
        os.remove(path)
    elif damage == "delete_checkpoint":
        shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_file", "delete_checkpoint"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, clean_six, damage):
    workdir = _four_then_damage(tmp_path, damage)
    summary = run(dataclasses.replace(TINY, workdir=workdir, rounds=6, resume=True, verbose=True))
    out = capsys.readouterr().out
    if damage != "delete_checkpoint":
        assert "resume: passed over checkpoint 4:" in out
    assert "resume: continuing after round 3" in out
    assert _records(workdir) == clean_six  # exactly the uninterrupted run
    assert summary["rounds_completed"] == 6


@pytest.mark.slow
def test_no_usable_checkpoint_is_one_error_before_compiling(tmp_path, monkeypatch):
    workdir = _four_then_damage(tmp_path, "flip")
    path = _biggest_state_file(workdir, 3)
    os.truncate(path, 10)
    from fedmask_jax import engine

    monkeypatch.setattr(engine.RoundFn, "compile", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(CheckpointError, match=r"--resume: no usable checkpoint in .*checkpoint 4: 1 "
                                               r"file\(s\) differ.*checkpoint 3: 1 file\(s\) differ"):
        run(dataclasses.replace(TINY, workdir=workdir, rounds=6, resume=True))


@pytest.mark.slow
def test_every_checkpoint_carries_an_integrity_record_written_last(tmp_path):
    workdir = str(tmp_path)
    run(dataclasses.replace(TINY, workdir=workdir, rounds=2))
    for step in (1, 2):
        with open(os.path.join(workdir, "checkpoints", str(step), "integrity.json")) as f:
            record = json.load(f)
        assert record["rounds_done"] == step and len(record["sha256"]) >= 3
        assert all(len(h) == 64 for h in record["sha256"].values())


@pytest.mark.slow
def test_a_moved_workdir_resumes_and_counts_its_rounds(tmp_path, clean_six):
    first = str(tmp_path / "first")
    run(dataclasses.replace(TINY, workdir=first, rounds=3))
    moved = str(tmp_path / "moved")
    shutil.move(first, moved)
    summary = run(dataclasses.replace(TINY, workdir=moved, rounds=6, resume=True))
    assert summary["rounds_completed"] == 6 and _records(moved) == clean_six
    again = run(dataclasses.replace(TINY, workdir=moved, rounds=6, resume=True))  # already finished
    assert again["rounds_completed"] == 6 and _records(moved) == clean_six


def test_a_changed_setting_is_refused_before_anything_is_built(tmp_path, no_compiling, monkeypatch):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"config": TINY.record()}))
    from fedmask_jax import experiment

    monkeypatch.setattr(experiment, "build", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match=r"--resume: .* --client_lr was 0\.1, now 0\.05"):
        run(dataclasses.replace(TINY, workdir=str(workdir), resume=True, method={"client_lr": 0.05}))


def test_too_many_classes_per_client_is_refused(tmp_path, no_compiling):
    with pytest.raises(ValueError, match="--classes_per_client=11 is more than the 10 classes of --dataset=digits"):
        run(dataclasses.replace(TINY, workdir=str(tmp_path), split="noniid", classes_per_client=11))


@pytest.mark.slow
def test_results_are_written_with_the_usual_file_mode(tmp_path):
    run(dataclasses.replace(TINY, workdir=str(tmp_path), rounds=1))
    plain = tmp_path / "plain"
    plain.write_text("x")
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.fmjx", "accuracy.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == outputs.FILE_MODE, name


def test_a_workdir_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    with outputs.WorkdirLock(str(tmp_path)):
        with pytest.raises(ValueError, match=rf"--workdir={tmp_path} is in use by another run \(pid {os.getpid()} on "):
            with outputs.WorkdirLock(str(tmp_path)):
                pass
    with outputs.WorkdirLock(str(tmp_path)):  # released on exit
        pass


def _default_sigint():
    # A suite started from a background shell job inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the run the disposition a terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


FLAGS = ["--dataset=digits", "--mlp_hidden=16", "--num_clients=4", "--clients_per_round=3",
         "--local_epochs=1", "--batch_size=32", "--notensorboard"]


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_stops_at_once_and_a_crashed_runs_lock_is_stale(tmp_path):
    workdir = str(tmp_path / "w")
    first = _cli(*FLAGS, "--rounds=100000", "--eval_every=1000", f"--workdir={workdir}", "--seed=0")
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(workdir, "config.json")):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.2)
        t0 = time.time()
        second = _cli(*FLAGS, "--rounds=2", f"--workdir={workdir}", "--seed=1")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and time.time() - t0 < 60
        assert f"error: --workdir={workdir} is in use by another run (pid {first.pid} on " in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert json.load(open(os.path.join(workdir, "config.json")))["config"]["seed"] == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = _cli(*FLAGS, "--rounds=2", f"--workdir={workdir}", "--seed=1")  # the lock died with it
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert json.load(open(os.path.join(workdir, "summary.json")))["seed"] == 1


@pytest.mark.slow
def test_exit_codes_nan_diverged_interrupted(tmp_path):
    nan = _cli(*FLAGS, "--client_lr=nan", f"--workdir={tmp_path / 'a'}")
    _, err = nan.communicate(timeout=120)
    assert nan.returncode == 2 and err == "error: --client_lr must be a finite number, got nan\n"
    diverged = _cli(*FLAGS, "--algorithm=fedavg", "--client_lr=1e9", "--rounds=3", f"--workdir={tmp_path / 'b'}")
    _, err = diverged.communicate(timeout=300)
    assert diverged.returncode == 4 and "diverged at round 1" in err
    assert os.path.exists(tmp_path / "b" / "summary.json")
    interrupted = _cli(*FLAGS, "--rounds=100000", "--eval_every=1000", f"--workdir={tmp_path / 'c'}")
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "c" / "config.json"):
        assert interrupted.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130
    assert err.strip().splitlines() == [f"interrupted: the rounds so far are in {tmp_path / 'c'}"]


def test_a_full_disk_is_one_error_line(monkeypatch, capsys, tmp_path):
    from absl import flags

    from experiments import run as cli
    from fedmask_jax import simulation

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "summary.json"))

    monkeypatch.setattr(simulation, "run", full)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", "--dataset=digits", f"--workdir={tmp_path}"])
    try:
        with pytest.raises(SystemExit) as e:
            cli.main([])
    finally:
        flags.FLAGS.unparse_flags()
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'summary.json'}: No space left on device; "
                                       "free some space or choose another --workdir\n")
