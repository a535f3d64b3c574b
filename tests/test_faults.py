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
from tests.helpers import wait_for_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = RunConfig(dataset="digits", mlp_hidden=(16,), num_clients=4, clients_per_round=3, rounds=4,
                 local_epochs=1, batch_size=32, eval_every=1, checkpoint_every=1, verbose=False,
                 tensorboard=False, plots=False, method={"persistent_client_optimizer": True})


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
    run(dataclasses.replace(TINY, workdir=str(tmp_path), rounds=1, plots=True))
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
         "--local_epochs=1", "--batch_size=32", "--notensorboard", "--noplots"]


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


# --- Issue 23: results on disk that agree with the run, settings in the checkpoint, one line
# per failure.


@pytest.fixture(scope="module")
def clean_three(tmp_path_factory):
    """A finished 3-round run checkpointed every round, and its rows."""
    workdir = str(tmp_path_factory.mktemp("three"))
    run(dataclasses.replace(TINY, workdir=workdir, rounds=3))
    return workdir, _records(workdir)


def _copy_of(tmp_path, workdir):
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("damage, note", [
    ("keep the first row", "round 2 missing"),
    ("garbage line 2", "round 2 missing; 1 unreadable line dropped"),
])
def test_resume_puts_back_the_rows_metrics_jsonl_lost_from_the_checkpoints_history(
        tmp_path, capsys, clean_three, damage, note):
    workdir = _copy_of(tmp_path, clean_three[0])
    path = os.path.join(workdir, "metrics.jsonl")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:1] if damage == "keep the first row"
                                    else [lines[0], "{garbage", lines[2]]) + "\n")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))  # resume from round 2
    run(dataclasses.replace(TINY, workdir=workdir, rounds=3, resume=True, verbose=True))
    out = capsys.readouterr().out
    assert f"resume: rewrote metrics.jsonl from the checkpoint's history: {note}\n" in out
    assert _records(workdir) == clean_three[1]  # rounds 1, 2, 3 once each, as uninterrupted
    run(dataclasses.replace(TINY, workdir=workdir, rounds=3, resume=True, verbose=True))
    assert "rewrote metrics.jsonl" not in capsys.readouterr().out  # nothing to repair now


@pytest.mark.slow
def test_a_deleted_config_json_does_not_turn_off_the_changed_settings_check(tmp_path, clean_three, monkeypatch):
    from fedmask_jax import experiment

    workdir = _copy_of(tmp_path, clean_three[0])
    os.remove(os.path.join(workdir, "config.json"))
    with open(os.path.join(workdir, "checkpoints", "3", "settings.json")) as f:
        assert json.load(f)["runs"][0]["method"]["client_lr"] == 0.1  # the checkpoint's own record
    monkeypatch.setattr(experiment, "build", lambda *a, **k: pytest.fail("built"))
    changed = dataclasses.replace(TINY, workdir=workdir, rounds=4, resume=True, method={
        **TINY.method, "client_lr": 0.05})
    with pytest.raises(ValueError, match=r"--resume: .* --client_lr was 0\.1, now 0\.05"):
        run(changed)
    # A config.json rewritten to agree with the new flags does not fool it either.
    open(os.path.join(workdir, "config.json"), "w").write(json.dumps({"config": changed.record()}))
    with pytest.raises(ValueError, match=r"--client_lr was 0\.1, now 0\.05"):
        run(changed)
    assert json.load(open(os.path.join(workdir, "config.json")))["config"]["method"]["client_lr"] == 0.05  # as left


@pytest.mark.slow
def test_a_checkpoint_without_its_settings_and_no_config_json_is_not_resumed_blind(tmp_path, clean_three):
    workdir = _copy_of(tmp_path, clean_three[0])
    os.remove(os.path.join(workdir, "config.json"))
    for step in (2, 3):  # as a checkpoint made before checkpoints carried their settings
        folder = os.path.join(workdir, "checkpoints", str(step))
        os.remove(os.path.join(folder, "settings.json"))
        record = json.load(open(os.path.join(folder, "integrity.json")))
        del record["sha256"]["settings.json"]
        open(os.path.join(folder, "integrity.json"), "w").write(json.dumps(record))
    with pytest.raises(ValueError, match=r"checkpoint 3 in .* does not record the settings it was made "
                                         r"with, and .*config.json is missing; pass --allow_config_change"):
        run(dataclasses.replace(TINY, workdir=workdir, rounds=3, resume=True))


def test_more_clients_than_examples_is_refused_from_the_counts_before_a_partition(tmp_path, no_compiling,
                                                                                monkeypatch):
    from fedmask_jax import experiment

    monkeypatch.setattr(experiment, "partition", lambda *a, **k: pytest.fail("partitioned"))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^--num_clients=100000000 is more than the \d+ training examples of "
                                         r"--dataset=digits, and every client needs at least one; choose at most"):
        run(dataclasses.replace(TINY, workdir=str(tmp_path), num_clients=100_000_000,
                                clients_per_round=1_000_000))
    assert time.perf_counter() - t0 < 10


def test_a_run_whose_arrays_cannot_fit_is_refused_before_they_are_allocated(tmp_path, no_compiling, monkeypatch):
    from fedmask_jax import engine, experiment

    for name in ("init_store", "client_data_from_partition"):
        monkeypatch.setattr(engine, name, lambda *a, **k: pytest.fail("allocated"))
    monkeypatch.setattr(engine, "device_memory_bytes", lambda backend=None: 2**20)
    cfg = dataclasses.replace(TINY, workdir=str(tmp_path), num_clients=1000, clients_per_round=10, batch_size=1)
    # Adam's two moments of every entry, for each of the 1000 clients.
    per_client = 2 * 4 * 1210
    with pytest.raises(ValueError, match=(
            r"^--num_clients=1000 --clients_per_round=10 needs about \d+\.\d MiB of memory \(persistent client "
            r"states 9\.\d MiB, .*\) and this machine has 1\.0 MiB; lower "
            r"--num_clients \(each client keeps 9\.\d KiB across rounds\)")):
        experiment.build(cfg)
    needed = engine.memory_needed(_tiny_algorithm(), engine.EngineConfig(client_chunk_size=2, collect=3),
                                  num_clients=1000, index_width=7)
    assert needed["client index"] == 1000 * 7 * 4
    assert needed["persistent client states"] >= 1000 * per_client
    assert needed["collected messages"] == 3 * 4 * -(-1210 // 32)  # bit-packed masks
    assert needed["buffered contributions"] == 0
    buffered = engine.memory_needed(_tiny_algorithm(), engine.EngineConfig(client_chunk_size=2), num_clients=1000,
                                    index_width=7, slots=50)
    assert buffered["buffered contributions"] == 50 * 4 * 1210  # a float32 contribution per slot


def _tiny_algorithm():
    from fedmask_jax import models
    from fedmask_jax.algorithms import registry

    arch = models.Architecture("mlp", 10, (8, 8, 1), mlp_hidden=(16,))
    return registry.spec("fedpm").build(arch, registry.method_config("fedpm", persistent_client_optimizer=True))


def test_load_model_names_a_folder_or_a_missing_path(tmp_path):
    from fedmask_jax import export

    for path in (str(tmp_path), str(tmp_path / "nope.fmjx")):
        with pytest.raises(export.ModelFileError, match=rf"^{path}: (Is a directory|No such file or directory); "
                                                        "give the path of a model file"):
            export.load_model(path)


@pytest.mark.parametrize("flag, allowed", [("--dataset=bogus", "mnist"), ("--straggler_policy=bogus", "drop")])
def test_a_choice_flag_out_of_its_choices_is_one_error_line_and_exit_2(capsys, flag, allowed):
    from absl import flags

    from experiments import cli, run as run_cli  # noqa: F401 -- defines the flags

    flags.FLAGS.unparse_flags()
    try:
        with pytest.raises(SystemExit) as e:
            cli.parse_flags(["prog", flag])
    finally:
        flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"error: flag {flag}: value should be one of <") and allowed in err
    assert err.count("\n") == 1


def test_a_checkpoint_on_a_full_disk_is_one_oserror_naming_the_folder(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from fedmask_jax.checkpoints import Checkpointer

    def full(self, *a, **k):  # what tensorstore raises, word for word but the paths
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "server.alpha/0.0" in OCDBT database: Failed to write '
                         "838818 bytes to file 6: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    server, store = _tiny_state()
    with pytest.raises(OSError) as e:
        Checkpointer(str(tmp_path)).save(1, server, store, [])
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "checkpoints")


def _tiny_state():
    import jax

    alg = _tiny_algorithm()
    from fedmask_jax import engine

    return alg.server_init(jax.random.key(0)), engine.init_store(alg, 2)


def _tmpfs(path, size):
    """A small filesystem of its own at ``path`` (root only), or None."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return path if ok else None


@pytest.mark.slow
def test_a_really_full_disk_is_one_error_line(tmp_path):
    disk = _tmpfs(tmp_path / "disk", "2M")
    if disk is None:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        proc = _cli(*FLAGS, "--mlp_hidden=300,100", "--rounds=6", "--checkpoint_every=1",
                    "--persistent_client_optimizer", f"--workdir={disk / 'w'}")
        _, err = proc.communicate(timeout=600)
    finally:
        subprocess.run(["umount", str(disk)])
    import re

    assert proc.returncode == 2
    assert len(err.splitlines()) == 1 and re.fullmatch(
        rf"error: {re.escape(str(disk / 'w' / 'checkpoints'))}: No space left on device while writing checkpoint "
        r"\d+; free some space or choose another --workdir\n", err), err


@pytest.mark.slow
def test_sigterm_ends_a_run_with_one_line_exit_143_and_its_rounds_on_disk(tmp_path):
    workdir = tmp_path / "w"
    proc = _cli(*FLAGS, "--rounds=100000", "--checkpoint_every=1", f"--workdir={workdir}")
    wait_for_checkpoint(workdir, proc, at_least=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert err.splitlines() == [f"terminated (SIGTERM): the rounds so far are in {workdir} (continue with --resume)"]
    rows = _records(str(workdir))
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2


@pytest.mark.slow
def test_the_cli_turns_absl_flag_errors_into_one_error_line(tmp_path):
    proc = _cli("--dataset=bogus", f"--workdir={tmp_path}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: flag --dataset=bogus: value should be one of <")
    assert err.count("\n") == 1 and "FATAL" not in err


def test_a_signal_during_a_checkpoint_save_is_delivered_once_the_checkpoint_is_whole(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from fedmask_jax.checkpoints import Checkpointer

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop()

    save = ocp.CheckpointManager.save

    def signalled_save(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, mid-save
        return save(self, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", signalled_save)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        checkpointer = Checkpointer(str(tmp_path), settings=[TINY.record()])
        with pytest.raises(Stop):
            checkpointer.save(1, *_tiny_state(), [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert checkpointer.steps() == [1] and checkpointer.problem(1) is None
    assert checkpointer.recorded_settings(1) == [json.loads(json.dumps(TINY.record()))]


def test_stderr_during_a_save_loses_only_the_closed_loop_tracebacks_however_they_are_split():
    import io
    import traceback

    from fedmask_jax.checkpoints import _ClosedLoopTracebacksDropped

    def tb(exc):
        try:
            raise exc
        except Exception:
            return traceback.format_exc()

    closed, other = tb(RuntimeError("Event loop is closed")), tb(KeyError("kept"))
    text = "progress 1/3\r" + closed + "a line\n" + other + closed + closed + "partial"
    for pieces in ([text], list(text), [text[i:i + 7] for i in range(0, len(text), 7)]):
        sink = io.StringIO()
        stream = _ClosedLoopTracebacksDropped(sink)
        for piece in pieces:
            stream.write(piece)
        assert stream.release() is sink
        assert sink.getvalue() == "progress 1/3\r" + "a line\n" + other + "partial"
    sink = io.StringIO()
    stream = _ClosedLoopTracebacksDropped(sink)
    stream.write("held until released: Trace")
    assert sink.getvalue() == "held until released: "
    stream.release()
    assert sink.getvalue() == "held until released: Trace"


def test_a_line_from_another_thread_inside_a_closed_loop_traceback_goes_through_alone():
    """CI's failure: tensorstore's thread had written the traceback's first lines when the
    run's error line came from the main thread, and the rest of the traceback came after."""
    import io
    import threading
    import traceback

    from fedmask_jax.checkpoints import _ClosedLoopTracebacksDropped

    try:
        raise RuntimeError("Event loop is closed")
    except RuntimeError:
        closed = traceback.format_exc()
    lines = closed.splitlines(keepends=True)
    first, rest = "".join(lines[:2]), "".join(lines[2:])  # the header and its first frame, then the rest
    assert lines[0].startswith("Traceback") and rest.endswith("RuntimeError: Event loop is closed\n")
    sink = io.StringIO()
    stream = _ClosedLoopTracebacksDropped(sink)
    writer_started, error_written = threading.Event(), threading.Event()

    def tensorstore_thread():
        stream.write(first)
        writer_started.set()
        error_written.wait(10)
        stream.write(rest)

    thread = threading.Thread(target=tensorstore_thread)
    thread.start()
    writer_started.wait(10)
    stream.write("error: /w/checkpoints: No space left on device while writing checkpoint 2\n")
    error_written.set()
    thread.join(10)
    stream.release()
    assert sink.getvalue() == "error: /w/checkpoints: No space left on device while writing checkpoint 2\n"
