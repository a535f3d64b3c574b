"""experiments.select_tuned: the tuning rule and the flagfile it writes, on a fake sweep folder."""

import json
import os
import subprocess
import sys

import pytest

from experiments import select_tuned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(folder, name, results, split="validation", rounds=10):
    """A finished sweep over ``name``: value -> accuracy, or ("diverged", round)."""
    rows = []
    for value, result in results.items():
        diverged = result[1] if isinstance(result, tuple) else None
        acc = float("nan") if diverged else result
        point = folder / f"{name}={value}"
        point.mkdir(parents=True)
        (point / "summary.json").write_text(json.dumps({
            "final_test_accuracy": acc, "diverged_at_round": diverged, "eval_split": split,
            "rounds": rounds, "rounds_completed": diverged or rounds,
            "config": {"validation_fraction": 0.1, "seed": 0}}))
        rows.append({name: value, "final_test_accuracy": acc, "diverged_at_round": diverged,
                     "status": "done"})
    (folder / "sweep.json").write_text(json.dumps(rows))
    return folder


def _points(tmp_path, results):
    return select_tuned.load_points(str(_sweep(tmp_path / "s", "client_lr", results)))


@pytest.mark.parametrize("results, chosen", [
    ({"0.3": 0.85, "0.1": 0.87, "0.03": 0.86}, "0.1"),          # the best
    ({"0.03": 0.8665, "0.1": 0.870, "0.3": 0.871}, "0.03"),     # the smallest within half a point
    ({"0.03": 0.864, "0.1": 0.870, "0.3": 0.871}, "0.1"),       # 0.03 is 0.7 points below
    ({"0.03": 0.80, "0.1": 0.80, "0.3": 0.8051}, "0.3"),        # the larger wins by > 0.5 points
    ({"0.03": 0.80, "0.1": ("diverged", 4), "0.3": ("diverged", 2)}, "0.03"),  # diverged: excluded
])
def test_the_smallest_value_within_half_a_point_of_the_best(tmp_path, results, chosen):
    name, points = _points(tmp_path, results)
    assert name == "client_lr" and [p["value"] for p in points] == ["0.03", "0.1", "0.3"]
    assert select_tuned.choose(points, 0.005)["value"] == chosen


def test_refuses_when_every_point_diverged_or_one_is_missing_or_not_validation(tmp_path):
    _, points = _points(tmp_path, {"0.1": ("diverged", 3), "0.3": ("diverged", 1)})
    with pytest.raises(ValueError, match="every point diverged"):
        select_tuned.choose(points, 0.005)
    folder = _sweep(tmp_path / "missing", "client_lr", {"0.1": 0.8, "0.3": 0.9})
    os.remove(folder / "client_lr=0.3" / "summary.json")
    with pytest.raises(ValueError, match="client_lr=0.3 has not finished"):
        select_tuned.load_points(str(folder))
    folder = _sweep(tmp_path / "test", "client_lr", {"0.1": 0.8}, split="test")
    with pytest.raises(ValueError, match="not a validation split"):
        select_tuned.load_points(str(folder))
    with pytest.raises(ValueError, match="no such file"):
        select_tuned.load_points(str(tmp_path / "nothing"))


def test_writes_a_flagfile_that_includes_the_base_and_sets_the_value_once(tmp_path):
    folder = _sweep(tmp_path / "s", "server_lr", {"0.3": 0.86, "1.0": 0.87, "3.0": ("diverged", 6)})
    out = tmp_path / "methods" / "fedavg.flags"
    args = [sys.executable, "-m", "experiments.select_tuned", f"--tuning_sweep={folder}",
            "--base_flagfile=experiments/configs/methods/fedavg.flags", f"--out_flagfile={out}",
            "--sweep_command=python -m experiments.sweep --sweep=server_lr=0.3,1.0,3.0"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "-> 1.0 (wrote" in proc.stdout
    text = out.read_text()
    flags = [line for line in text.splitlines() if not line.startswith("#")]
    assert flags == ["--flagfile=experiments/configs/methods/fedavg.flags", "--server_lr=1.0"]
    assert "over {0.3, 1.0, 3.0}" in text and "0.8600, 0.8700, diverged at round 6 -> 1.0" in text
    assert "tuned on the CNN" in text and "--sweep=server_lr=0.3,1.0,3.0" in text
    # the comparison accepts it as fedavg's flagfile (the base is read from the working directory)
    from experiments import compare
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert compare.entry_algorithm("fedavg", str(out.parent)) == "fedavg"
    finally:
        os.chdir(cwd)
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "(unchanged" in again.stdout and out.read_text() == text
    os.remove(folder / "server_lr=0.3" / "summary.json")
    bad = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has not finished" in bad.stderr and out.read_text() == text


@pytest.mark.parametrize("results, side, grid", [
    ({"0.03": 0.25, "0.1": 0.64, "0.3": 0.74}, "largest", ["0.03", "0.1", "0.3", "0.9"]),
    ({"0.3": 0.80, "1.0": 0.79, "3.0": 0.70}, "smallest", ["0.09", "0.3", "1.0", "3.0"]),
    ({"0.03": 0.8665, "0.1": 0.870, "0.3": 0.871}, None, None),  # the smallest, but within half a point
    ({"0.03": 0.86, "0.1": 0.87, "0.3": 0.85}, None, None),
    ({"0.03": 0.80, "0.1": ("diverged", 4), "0.3": ("diverged", 2)}, "smallest", ["0.009", "0.03", "0.1", "0.3"]),
])
def test_a_best_value_at_an_end_of_the_grid_asks_for_one_more_step(tmp_path, results, side, grid):
    _, points = _points(tmp_path, results)
    chosen = select_tuned.choose(points, 0.005)
    assert select_tuned.edge(points, chosen, 0.005) == side
    if side:
        assert select_tuned.wider_grid(points, side) == grid


def test_extend_at_edge_writes_nothing_and_prints_the_wider_grid(tmp_path):
    folder = _sweep(tmp_path / "s", "client_lr", {"0.03": 0.25, "0.1": 0.64, "0.3": 0.74})
    out = tmp_path / "fedpm.flags"
    args = [sys.executable, "-m", "experiments.select_tuned", f"--tuning_sweep={folder}",
            "--base_flagfile=experiments/configs/methods/fedpm.flags", f"--out_flagfile={out}"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(args + ["--extend_at_edge"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 6 and not out.exists(), proc.stderr
    assert proc.stdout.splitlines()[-1] == "GRID client_lr=0.03,0.1,0.3,0.9"
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "the grid's largest" in out.read_text() and "--client_lr=0.3" in out.read_text()
