"""One run as two jax.distributed processes on this host gives the records of one process
with as many devices; only process 0 writes."""

import json
import os
import subprocess
import sys

import jax
import pytest

from fedmask_jax import distributed
from experiments import multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 7 of 12 clients on 4 devices, 2 per process: the round's sums cross processes, and so do
# the coding check's collected masks and the persistent client optimizer's store.
TINY_FLAGS = ["--flagfile=experiments/configs/distributed_tiny.flags"]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path, devices_alone):
    workdir = str(tmp_path / "two")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.multiprocess", "--processes=2", "--cpu_devices=2", "--compare",
         "--timeout_s=400", "--", *TINY_FLAGS, f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes match one process" in proc.stdout
    assert proc.stdout.count("round    1/3") == 1  # one console: process 0's
    two, one = _records(workdir), _records(workdir + "_one_process")
    assert [r["round"] for r in two] == [1, 2, 3]
    assert [r["verified_clients"] for r in two] == [3, 3, 3]
    problems, compared, _ = multiprocess.compare_records(two, one)
    assert not problems and compared > 50, problems
    with open(os.path.join(workdir, "config.json")) as f:
        record = json.load(f)
    assert record["processes"] == 2 and len(record["devices"]) == 4
    for w in (workdir, workdir + "_one_process"):
        with open(os.path.join(w, "summary.json")) as f:
            assert json.load(f)["num_devices"] == 4
    assert os.path.isfile(os.path.join(workdir, "model.fmjx"))


@pytest.mark.slow
def test_a_secondary_process_writes_nothing(tmp_path, monkeypatch):
    from fedmask_jax.simulation import RunConfig, run

    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    workdir = tmp_path / "never"
    summary = run(RunConfig(dataset="digits", mlp_hidden=(16,), num_clients=4, clients_per_round=2,
                            rounds=1, local_epochs=1, batch_size=32, workdir=str(workdir)))
    assert summary["rounds_completed"] == 1 and "final_model_file" not in summary
    assert not workdir.exists()


def test_multiprocess_mesh_needs_every_process_and_the_scanned_round(monkeypatch):
    monkeypatch.setattr(distributed, "multiprocess", lambda: True)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"belong to processes \[0\] of 2"):
        distributed.check_mesh(jax.devices(), "scan")
    with pytest.raises(ValueError, match="needs --strategy=scan"):
        distributed.check_mesh(jax.devices(), "host_loop")


def test_compare_records_ignores_timings_and_names_differences():
    a = [{"round": 1, "test_loss": 1.0, "round_time_s": 0.1, "elapsed_s": 3.0, "algorithm": "fedpm"}]
    same = [dict(a[0], test_loss=1.0 + 1e-7, round_time_s=9.0, elapsed_s=1.0)]
    assert multiprocess.compare_records(a, same)[0] == []
    assert multiprocess.compare_records(a, [dict(a[0], test_loss=1.1)])[0] == ["round 1: test_loss 1.0 vs 1.1"]
    assert "fields differ" in multiprocess.compare_records(a, [dict(a[0], extra=1)])[0][0]
    assert "rounds differ" in multiprocess.compare_records(a, [dict(a[0], round=2)])[0][0]


@pytest.mark.slow
def test_process_flags_need_distributed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--dataset=digits", "--process_id=1",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --process_id needs --distributed"


def test_placing_host_values_and_keys_leaf_by_leaf():
    """What a multi-process put does with each leaf (here on one process's device)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(jax.devices()[:1], ("clients",)), PartitionSpec())
    tree = {"a": jax.numpy.arange(3), "key": jax.random.key(5)}
    for placed in (distributed.put(tree, sharding), jax.tree.map(lambda x: distributed._put_leaf(x, sharding), tree)):
        assert placed["a"].tolist() == [0, 1, 2] and placed["a"].sharding == sharding
        assert jax.random.key_data(placed["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()
        assert jax.random.key_impl(placed["key"]) == jax.random.key_impl(tree["key"])
