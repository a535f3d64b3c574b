"""Sharding the cohort over 8 virtual CPU devices gives the metrics of one device."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses, CLIs or many devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import dataclasses, json, sys
import jax
from fedmask_jax.simulation import RunConfig, run  # before the backend starts: it reserves its threads
assert len(jax.devices()) == 8, jax.devices()
base = RunConfig(dataset="digits", model="mlp", mlp_hidden=(32,), num_clients=12,
                 clients_per_round=7, rounds=3, local_epochs=1, batch_size=32, verbose=False,
                 client_chunk_size=1, uplink_mbps="lognormal:-4,1",
                 method={"persistent_client_optimizer": True, "verify_coded_clients": "3"})
out = {}
for nd in (1, 8):
    s = run(dataclasses.replace(base, num_devices=nd, workdir=sys.argv[1] + f"/d{nd}"))
    assert s["num_devices"] == nd and s["verified_clients_total"] == 9
    out[nd] = [json.loads(l) for l in open(sys.argv[1] + f"/d{nd}/metrics.jsonl")]
# buffered aggregation: each device writes its refills into the shared slots
buffered = dataclasses.replace(base, aggregation="buffered", concurrency=10, buffer_size=8,
                               local_work="uniform:0.5,1.5", staleness="poly:1")
for nd in (1, 8):
    run(dataclasses.replace(buffered, num_devices=nd, workdir=sys.argv[1] + f"/b{nd}"))
    out[f"b{nd}"] = [json.loads(l) for l in open(sys.argv[1] + f"/b{nd}/metrics.jsonl")]
print("RESULT " + json.dumps(out))
"""


def test_eight_devices_match_one(tmp_path, devices_alone):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    one, eight = out["1"], out["8"]
    assert len(one) == len(eight) == 3
    for a, b in zip(one, eight):
        assert a["verified_clients"] == b["verified_clients"] == 3
        for key in ("test_accuracy", "test_accuracy_thresholded", "test_loss", "uplink_bpp",
                    "mask_density", "train_loss", "uplink_bpp_coded_prior", "uplink_bpp_measured_prior",
                    "sim_round_s"):  # the slowest client's coded message, from every device's positions
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert len(out["b1"]) == len(out["b8"]) == 3 and max(r["staleness_max"] for r in out["b1"]) > 0
    for a, b in zip(out["b1"], out["b8"]):
        for key in ("test_accuracy", "test_loss", "train_loss", "uplink_bpp_coded_prior", "sim_time_s",
                    "staleness_mean"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), ("buffered", key, a[key], b[key])
