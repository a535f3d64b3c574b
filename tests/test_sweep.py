import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses, CLIs or many devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(tmp_path, *extra):
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("\n".join([
        "--dataset=digits", "--model=mlp", "--mlp_hidden=16", "--num_clients=4",
        "--clients_per_round=2", "--rounds=2", "--local_epochs=1", "--batch_size=32"]))
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
