import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses, CLIs or many devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("\n".join([
        "--dataset=digits", "--model=mlp", "--mlp_hidden=16", "--num_clients=4",
        "--clients_per_round=2", "--rounds=2", "--local_epochs=1", "--batch_size=32", "--noplots"]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", f"--flagfile={flagfile}",
         f"--sweep_dir={tmp_path / 'sweep'}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_sweep_runs_grid_survives_a_failed_point_and_resumes(tmp_path):
    # batch_size=5000 is larger than every client's data: that point fails, the others run.
    proc = _sweep(tmp_path, "--sweep=clients_per_round=2,4;batch_size=32,5000")
    assert proc.returncode == 1, proc.stderr
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"].startswith("failed")]
    assert len(done) == 2 and len(failed) == 2
    assert all(r["batch_size"] == "5000" for r in failed)
    assert all(float(r["final_test_accuracy"]) > 0 for r in done)
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("| done |") == 2
    assert (tmp_path / "sweep" / "accuracy.png").is_file()
    # Re-running skips what finished.
    again = _sweep(tmp_path, "--sweep=clients_per_round=2,4;batch_size=32")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already done") == 2


def test_sweep_rejects_unknown_flag(tmp_path):
    proc = _sweep(tmp_path, "--sweep=learning_rate=1,2")
    assert proc.returncode == 2 and "not a flag of experiments.run" in proc.stderr


def _metrics(folder):
    import json

    with open(folder / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    timing = ("elapsed_s", "eval_time_s", "round_time_s", "wall_time_s", "coding_time_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_points_sharing_a_shape_run_as_one_program_with_the_outputs_of_one_process_each(tmp_path):
    import json

    grid = "--sweep=client_lr=0.05,0.1,0.2"
    vec = _sweep(tmp_path / "v", grid, "--max_runs_per_program=2")
    one = _sweep(tmp_path / "o", grid, "--novectorize")
    assert vec.returncode == 0 and one.returncode == 0, (vec.stderr, one.stderr)
    assert "running 3 points sharing one shape as one program" in vec.stdout
    assert "one program" not in one.stdout
    # At most 2 runs per program: a batch of 2 (its checkpoints in .batches) and a single run.
    batch_dirs = [d for d in os.listdir(tmp_path / "v" / "sweep" / ".batches") if not d.startswith("group-")]
    assert len(batch_dirs) == 1
    in_program = []
    for name in ("client_lr=0.05", "client_lr=0.1", "client_lr=0.2"):
        v, o = tmp_path / "v" / "sweep" / name, tmp_path / "o" / "sweep" / name
        assert sorted(os.listdir(v)) == sorted(os.listdir(o))  # the same files per point
        assert _metrics(v) == _metrics(o), name  # and the same numbers
        with open(v / "summary.json") as f:
            in_program.append(json.load(f)["runs_in_program"])
        with open(o / "summary.json") as f:
            assert json.load(f)["runs_in_program"] == 1
        assert "done: fedpm test accuracy" in (v / "sweep_log.txt").read_text()  # its console lines
    assert sorted(in_program) == [1, 2, 2]
    assert len({json.dumps(_metrics(tmp_path / "v" / "sweep" / n)) for n in os.listdir(tmp_path / "v" / "sweep")
                if n.startswith("client_lr=")}) == 3  # the points really differ
    with open(tmp_path / "v" / "sweep" / "sweep.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"] * 3


@pytest.mark.parametrize("args, message", [
    (["--sweep=client_lr="], "error: --sweep: 'client_lr=' gives client_lr no values; write client_lr=v1,v2\n"),
    (["--sweep=;"], "error: --sweep=';' names no flag; write 'flag=v1,v2;other=a,b'\n"),
    (["--sweep=seed=0,1", "--shard=2/2"],
     "error: --shard=2/2 must be i/n with 0 <= i < n, e.g. --shard=0/2 and --shard=1/2\n"),
    (["--sweep=seed=0,1", "--shard=half"],
     "error: --shard=half must be i/n with 0 <= i < n, e.g. --shard=0/2 and --shard=1/2\n"),
])
def test_a_sweep_that_would_run_nothing_or_an_unusable_shard_is_one_error_line(tmp_path, args, message):
    proc = _sweep(tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr == message
    assert not (tmp_path / "sweep" / "sweep.csv").exists()  # no empty table passed off as a result


def test_a_second_sweep_on_one_sweep_dir_stops_at_once(tmp_path):
    import socket

    from fedmask_jax.outputs import WorkdirLock

    (tmp_path / "sweep").mkdir(parents=True)
    with WorkdirLock(str(tmp_path / "sweep"), flag="--sweep_dir", holder="sweep"):  # the first sweep
        proc = _sweep(tmp_path, "--sweep=seed=0,1")
    assert proc.returncode == 2
    assert proc.stderr == (f"error: --sweep_dir={tmp_path / 'sweep'} is in use by another sweep (pid {os.getpid()} on "
                           f"{socket.gethostname()}); wait for it to finish or choose another --sweep_dir\n")
    assert not (tmp_path / "sweep" / "seed=0").exists()


def _start_sweep(tmp_path, *extra):
    import signal

    flagfile = tmp_path / "long.flags"
    flagfile.write_text("\n".join([
        "--dataset=digits", "--model=mlp", "--mlp_hidden=16", "--num_clients=4", "--clients_per_round=2",
        "--rounds=100000", "--eval_every=1000", "--local_epochs=1", "--batch_size=32", "--checkpoint_every=1"]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.sweep", f"--flagfile={flagfile}", f"--sweep_dir={tmp_path / 'sweep'}",
         "--sweep=seed=0,1", "--novectorize", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,  # its own process group, as a terminal's job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_stops_its_point_cleanly_with_one_line(tmp_path, how):
    import signal

    from tests.helpers import wait_for_checkpoint

    proc = _start_sweep(tmp_path)
    point = tmp_path / "sweep" / "seed=0"
    wait_for_checkpoint(point, proc)
    if how == "ctrl-c":  # a terminal signals the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:  # a scheduler's SIGTERM may reach the sweep alone: it hands it on
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    code, what = (130, "interrupted") if how == "ctrl-c" else (143, "terminated (SIGTERM)")
    assert proc.returncode == code
    assert err == (f"{what}: the finished points are in {tmp_path / 'sweep'}; run the same command again "
                   "to continue\n")
    log = (point / "sweep_log.txt").read_text()
    assert f"{what}: the rounds so far are in {point} (continue with --resume)" in log  # it stopped itself
    assert "Traceback" not in log
    assert not (tmp_path / "sweep" / "seed=1").exists()  # the sweep went no further


@pytest.mark.parametrize("taken, refused", [
    ((0, 2), [(0, 2, "sweep of --shard=0/2"), (0, 1, "sweep")]),  # the same shard again; the whole grid
    ((0, 1), [(1, 2, "sweep"), (0, 1, "sweep")]),
])
def test_the_shards_of_one_sweep_share_its_folder_but_each_point_runs_once(tmp_path, taken, refused):
    import re

    from experiments.launch import sweep_locks

    held = [lock.__enter__() for lock in sweep_locks(str(tmp_path), *taken)]
    if taken[1] > 1:  # another shard of the same sweep goes side by side
        held += [lock.__enter__() for lock in sweep_locks(str(tmp_path), 1, 2)]
    for i, n, who in refused:
        attempt = sweep_locks(str(tmp_path), i, n)
        with pytest.raises(ValueError, match=rf"--sweep_dir={re.escape(str(tmp_path))} is in use by another {who} "):
            for lock in attempt:
                lock.__enter__()
        for lock in attempt:
            lock.__exit__()
    for lock in held:
        lock.__exit__()
