"""The benchmark CLI end to end on a tiny case: the JSON fields issue 3 asks for, and the table."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses, CLIs or many devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch")


def test_benchmark_writes_json_and_docs_table(tmp_path, fashion_mnist_tfds):
    docs = tmp_path / "bench.md"
    docs.write_text("# B\n\nbefore\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--cases=mlp_w05_k10",
         "--examples_per_client=16", "--local_epochs=1", "--batch_size=8", "--timed_rounds=3",
         "--min_timed_seconds=0", f"--workdir={tmp_path / 'out'}", f"--docs={docs}",
         f"--data_dir={fashion_mnist_tfds}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [r] = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    for key in ("case", "model", "clients_per_round", "jax_rounds_per_s", "torch_rounds_per_s",
                "speedup", "gemm_peak_gflops", "achieved_gflops", "compile_time_s", "peak_rss_mb"):
        assert r[key] is not None, key
    assert (r["case"], r["model"], r["clients_per_round"]) == ("mlp_w05_k10", "mlp", 10)
    assert len(r["jax_round_seconds"]) >= 3 and len(r["torch_round_seconds"]) >= 3
    # Rates are one over the median round, and the speedup is their ratio.
    assert r["jax_rounds_per_s"] == pytest.approx(1 / np.median(r["jax_round_seconds"]))
    assert r["speedup"] == pytest.approx(r["jax_rounds_per_s"] / r["torch_rounds_per_s"])
    assert r["compiler_options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert r["gemm_peak_gflops"] > 1 and 0 < r["achieved_gflops"] < r["gemm_peak_gflops"]
    text = docs.read_text()
    assert "old" not in text and text.startswith("# B\n\nbefore\n") and text.endswith("after\n")
    assert "| mlp_w05_k10 | scan/" in text
