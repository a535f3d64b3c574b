"""The comparison runner end to end on digits, and the shipped comparison flagfiles."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS_DIR = os.path.join(ROOT, "experiments", "configs", "methods")


def _compare(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "experiments.compare", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _main(*args) -> int:
    """experiments.compare's main in this process with these flags; its exit status."""
    from absl import flags

    from experiments import compare

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *args])
    try:
        compare.main([])
        return 0
    except SystemExit as e:
        return e.code
    finally:
        flags.FLAGS.unparse_flags()


def _compare_here(capsys, *args):
    """experiments.compare's main in this process, for what needs no new run (bad input, a
    comparison whose runs are done): the exit status, stdout and stderr, as ``_compare`` gives
    them, without a process's start-up."""
    capsys.readouterr()
    code = _main(*args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


SETTING = ["--dataset=digits", "--model=mlp", "--mlp_hidden=32", "--num_clients=4",
           "--clients_per_round=3", "--rounds=3", "--local_epochs=1", "--batch_size=32",
           "--eval_every=1", "--notensorboard", "--noplots"]


@pytest.mark.slow
def test_compare_runs_methods_on_one_setting_and_writes_table_and_plots(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    proc = _compare(*SETTING, "--methods=fedpm,fedavg,topk", f"--method_configs={METHODS_DIR}",
                    f"--compare_dir={out}", "--target_accuracy=0.3")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    with open(os.path.join(out, "compare.json")) as f:
        rows = json.load(f)
    assert [r["method"] for r in rows] == ["fedpm", "fedavg", "topk"]
    for row in rows:
        for key in ("final_test_accuracy", "mean_uplink_bpp", "total_uplink_mb", "rounds_to_target"):
            assert key in row, key
        # total uplink = mean bits per client and round * entries * clients * rounds
        expected_mb = row["mean_uplink_bpp"] * row["num_params"] * 3 * 3 / 8e6
        assert row["total_uplink_mb"] == pytest.approx(expected_mb, rel=1e-6)
        with open(os.path.join(out, row["method"], "metrics.jsonl")) as f:
            accs = [json.loads(line)["test_accuracy"] for line in f]
        first = next((i + 1 for i, a in enumerate(accs) if a >= 0.3), None)
        assert row["rounds_to_target"] == first
    by = {r["method"]: r for r in rows}
    assert by["fedavg"]["mean_uplink_bpp"] == 32.0
    assert by["fedpm"]["mean_uplink_bpp"] < 1.01 < by["topk"]["mean_uplink_bpp"] * 100
    # Same setting for every method: the same split and cohorts, read from each run's config.
    configs = []
    for m in ("fedpm", "fedavg", "topk"):
        with open(os.path.join(out, m, "config.json")) as f:
            configs.append(json.load(f)["config"])
    for key in ("dataset", "num_clients", "clients_per_round", "rounds", "seed", "split"):
        assert len({json.dumps(c[key]) for c in configs}) == 1, key
    assert [c["algorithm"] for c in configs] == ["fedpm", "fedavg", "topk"]
    table = open(os.path.join(out, "compare.md")).read()
    assert table.count("| done |") == 3 and "rounds to target" in table
    for name in ("compare_accuracy.png", "compare_accuracy_vs_uplink.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = _compare_here(capsys, *SETTING, "--methods=fedpm,fedavg,topk", f"--method_configs={METHODS_DIR}",
                          f"--compare_dir={out}", "--target_accuracy=0.3")
    assert again.returncode == 0 and again.stdout.count("already done") == 3


def test_a_method_flagfile_may_not_change_the_shared_setting(tmp_path, capsys):
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / "fedavg.flags").write_text("--algorithm=fedavg\n--rounds=50\n")
    proc = _compare_here(capsys, *SETTING, "--methods=fedavg", f"--method_configs={folder}",
                         f"--compare_dir={tmp_path / 'cmp'}")
    assert proc.returncode == 2
    assert "fedavg.flags:2: --rounds is part of the shared setting" in proc.stderr
    proc = _compare_here(capsys, *SETTING, "--methods=fedavg,nope", f"--method_configs={METHODS_DIR}",
                         f"--compare_dir={tmp_path / 'cmp'}")
    assert proc.returncode == 2 and "'nope' is unknown" in proc.stderr
    (folder / "fedavg.flags").write_text("--algorithm=fedavg\n--topk_fraction=0.1\n")
    proc = _compare_here(capsys, *SETTING, "--methods=fedavg", f"--method_configs={folder}",
                         f"--compare_dir={tmp_path / 'cmp'}")
    assert proc.returncode == 2 and "fedavg.flags:2: --topk_fraction is not a setting of fedavg" in proc.stderr


@pytest.mark.slow
def test_a_sigterm_to_the_comparison_alone_stops_its_run_and_goes_no_further(tmp_path):
    """A scheduler's (or `timeout`'s) SIGTERM reaches the comparison, not its run: the run is
    stopped with its rounds on disk, and no other method starts."""
    import signal

    from tests.helpers import wait_for_checkpoint

    out = tmp_path / "cmp"
    setting = [a for a in SETTING if not a.startswith(("--rounds=", "--eval_every="))]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.compare", *setting, "--rounds=100000", "--eval_every=1000",
         "--checkpoint_every=1", "--methods=fedavg,fedpm", f"--method_configs={METHODS_DIR}",
         f"--compare_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)  # its own process group: the signal reaches it alone
    try:
        wait_for_checkpoint(out / "fedavg", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:  # whatever happened, no 100,000-round run outlives the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 143
    assert err.splitlines()[-1] == (f"terminated (SIGTERM): the finished runs are in {out}; run the same "
                                    "command again to continue")
    log = (out / "fedavg" / "sweep_log.txt").read_text()
    assert f"terminated (SIGTERM): the rounds so far are in {out / 'fedavg'} (continue with --resume)" in log
    assert not (out / "fedpm").exists()


def test_shipped_method_flagfiles_are_valid_with_the_shipped_setting(monkeypatch):
    from absl import flags

    from experiments import compare, run as run_cli  # noqa: F401 -- defines the flags
    from fedmask_jax.algorithms.registry import METHODS

    setting = os.path.join(ROOT, "experiments", "configs", "fmnist_mlp_compare.flags")
    entries = sorted(f[:-6] for f in os.listdir(METHODS_DIR))
    assert set(METHODS) <= set(entries)  # every method has its flagfile; the rest are variants
    for entry in entries:
        path = compare.method_flagfile(entry, METHODS_DIR)
        text = open(path).read()
        assert "tuned here" in text or "reference code" in text or "paper" in text, path
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", f"--flagfile={setting}", f"--flagfile={path}"])
        cfg = run_cli.config_from_flags()  # builds and checks the RunConfig
        assert cfg.algorithm == compare.entry_algorithm(entry, METHODS_DIR)
        assert entry not in METHODS or cfg.algorithm == entry
    monkeypatch.chdir(ROOT)  # a method flagfile's --flagfile= includes are read from here, as absl does
    cnn = os.path.join(ROOT, "experiments", "configs", "methods_conv4_cpu")
    setting = os.path.join(ROOT, "experiments", "configs", "fmnist_conv4_cpu.flags")
    for name in sorted(os.listdir(cnn)):
        entry, text = name[:-6], open(os.path.join(cnn, name)).read()
        # says where its values come from: tuned on the CNN, not yet, or the MLP comparison's
        assert ("MLP-tuned values" in text or "tuned on the CNN" in text or "NOT YET TUNED" in text), name
        assert f"--flagfile=experiments/configs/methods/{entry}.flags" in text, name
        assert compare.entry_algorithm(entry, cnn) == compare.entry_algorithm(entry, METHODS_DIR)
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", f"--flagfile={setting}", f"--flagfile={os.path.join(cnn, name)}"])
        assert run_cli.config_from_flags().model == "conv4"
    configs = os.path.join(ROOT, "experiments", "configs")
    shipped = sorted(f for f in os.listdir(configs) if f.startswith("compare") and f.endswith(".flags"))
    assert "compare_fmnist.flags" in shipped
    for name in shipped:  # each comparison flagfile parses and its shared setting is valid
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", f"--flagfile={os.path.join(configs, name)}"])
        # every method but on this CPU's CNN and the network comparison (the six its issue names)
        assert set(flags.FLAGS.methods) >= set(METHODS) - {"klms", "eden"} or "cpu" in name or "network" in name
        for method in flags.FLAGS.methods + flags.FLAGS.second_methods:
            compare.method_flagfile(method, os.path.join(ROOT, flags.FLAGS.method_configs))
        run_cli.config_from_flags()
    flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_variants_seeds_and_a_second_setting(tmp_path, capsys):
    """A variant flagfile of a method, more seeds for a chosen entry and the strongest
    baseline, and a second (non-IID) setting, each in its own workdir; the tables aggregate.
    Which entries each part starts, and in what order, is _fake_compare's test below."""
    folder = tmp_path / "methods"
    folder.mkdir()
    for name in ("fedpm", "fedavg"):
        (folder / f"{name}.flags").write_text(open(os.path.join(METHODS_DIR, f"{name}.flags")).read())
    (folder / "fedpm_kaiming.flags").write_text("--algorithm=fedpm\n--weight_init=signed_kaiming\n")
    out = tmp_path / "cmp"
    setting = [a for a in SETTING if not a.startswith("--rounds=")] + ["--rounds=2"]
    args = [*setting, "--methods=fedpm,fedpm_kaiming,fedavg", f"--method_configs={folder}",
            f"--compare_dir={out}", "--target_accuracy=0.3", "--seeds=1", "--seeds_for=fedpm,top1_baselines",
            "--second_setting=--split=noniid --classes_per_client=2", "--second_methods=fedpm"]
    proc = _compare(*args)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    with open(out / "fedpm_kaiming" / "config.json") as f:
        cfg = json.load(f)["config"]
    assert cfg["algorithm"] == "fedpm" and cfg["method"]["weight_init"] == "signed_kaiming"
    rows = {r["method"]: r for r in json.load(open(out / "compare.json"))}
    # fedpm_kaiming is FedPM's own: the strongest baseline is fedavg, the only other entry
    assert set(rows) == {"fedpm", "fedpm_kaiming", "fedavg", "fedpm@seed1", "fedavg@seed1"}
    with open(out / "fedpm@seed1" / "config.json") as f:
        assert json.load(f)["config"]["seed"] == 1
    table = open(out / "compare.md").read()
    accs = [rows["fedpm"]["final_test_accuracy"], rows["fedpm@seed1"]["final_test_accuracy"]]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2 ** 0.5
    assert f"| fedpm | 2 | {mean:.4f} ± {std:.4f} |" in table
    assert (out / "compare_seeds_accuracy.png").is_file() and (out / "compare_seeds_accuracy_vs_uplink.png").is_file()
    second = {r["method"]: r for r in json.load(open(out / "noniid" / "compare.json"))}
    assert set(second) == {"fedpm"} and second["fedpm"]["status"] == "done"
    with open(out / "noniid" / "fedpm" / "config.json") as f:
        c = json.load(f)["config"]
    assert c["split"] == "noniid" and c["classes_per_client"] == 2
    again = _compare_here(capsys, *args)
    assert again.returncode == 0 and again.stdout.count("already done") == 6
    bad = _compare_here(capsys, *setting, "--methods=fedpm", f"--method_configs={folder}", "--seeds=1",
                        "--seeds_for=fedavg", f"--compare_dir={out}")
    assert bad.returncode == 2 and "--seeds_for: 'fedavg' is not one of --methods" in bad.stderr
    bad = _compare_here(capsys, *setting, "--methods=fedpm", f"--method_configs={folder}",
                        "--second_methods=fedpm", "--second_setting=--client_lr=0.3", f"--compare_dir={out}")
    assert bad.returncode == 2 and "is not a run flag" in bad.stderr


def test_a_method_flagfile_may_include_another(tmp_path, monkeypatch):
    from experiments import compare

    monkeypatch.chdir(tmp_path)  # includes are read from the working directory, as absl does
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "fedavg.flags").write_text("--algorithm=fedavg\n--client_lr=0.1\n")
    (tmp_path / "base" / "fedpm.flags").write_text("# reference code\n--algorithm=fedpm\n--client_lr=0.1\n")
    folder = tmp_path / "cnn"
    folder.mkdir()
    (folder / "fedavg.flags").write_text("# tuned\n--flagfile=base/fedavg.flags\n--server_lr=3.0\n")
    (folder / "kaiming.flags").write_text("--flagfile=base/fedpm.flags\n--weight_init=signed_kaiming\n")
    assert compare.method_flagfile("fedavg", str(folder)) == str(folder / "fedavg.flags")
    assert compare.entry_algorithm("fedavg", str(folder)) == "fedavg"
    assert compare.entry_algorithm("kaiming", str(folder)) == "fedpm"
    (tmp_path / "base" / "fedavg.flags").write_text("--algorithm=fedavg\n--rounds=5\n")
    with pytest.raises(ValueError, match="base/fedavg.flags:2: --rounds is part of the shared setting"):
        compare.method_flagfile("fedavg", str(folder))
    (folder / "fedavg.flags").write_text("--flagfile=base/nope.flags\n")
    with pytest.raises(ValueError, match="fedavg.flags:1: --flagfile=base/nope.flags: no such file"):
        compare.method_flagfile("fedavg", str(folder))
    (folder / "fedavg.flags").write_text("--server_lr=1.0\n--flagfile=base/fedpm.flags\n")
    with pytest.raises(ValueError, match="--algorithm=... must come first"):
        compare.method_flagfile("fedavg", str(folder))
    (folder / "fedavg.flags").write_text("--flagfile=base/fedpm.flags\n")
    with pytest.raises(ValueError, match="must contain --algorithm=fedavg"):
        compare.method_flagfile("fedavg", str(folder))
    (folder / "fedavg.flags").write_text("--algorithm=fedavg\n--flagfile=cnn/fedavg.flags\n")
    with pytest.raises(ValueError, match="includes itself"):
        compare.method_flagfile("fedavg", str(folder))


def _fake_compare(monkeypatch, tmp_path, *args):
    """Runs experiments.compare's main with its runs and tables faked: returns the runs it
    started, in order, and its exit status. A run "finishes" with accuracies by name."""
    from experiments import compare

    accuracy = {"fedpm": 0.7, "fedavg": 0.9, "signsgd": 0.8}
    started, tables = [], {}

    def run(name, algorithm, folder, passthrough, status, seed=None):
        started.append(os.path.relpath(os.path.join(folder, name), tmp_path))
        os.makedirs(os.path.join(folder, name))  # finished (and never started twice)
        status[name] = "done"

    def report(methods, compare_dir, status, target, repeats=None):
        names = methods + [r for m in methods for r in (repeats or {}).get(m, [])]
        rows = []
        for name in names:
            if os.path.isdir(os.path.join(compare_dir, name)):
                rows.append({"method": name, "status": "done",
                             "final_test_accuracy": accuracy[name.split("@")[0]]})
            else:
                rows.append({"method": name, "status": status.get(name, "not run")})
        with open(os.path.join(compare_dir, "compare.md"), "w") as f:
            f.write("table\n")
        tables[os.path.relpath(compare_dir, tmp_path)] = {r["method"]: r["status"] for r in rows}
        return rows

    monkeypatch.setattr(compare, "_run", run)
    monkeypatch.setattr(compare, "report", report)
    code = _main(*SETTING, "--methods=fedpm,fedavg,signsgd", f"--method_configs={METHODS_DIR}",
                 f"--compare_dir={tmp_path}", "--seeds=1", "--seeds_for=fedpm,top1_baselines",
                 "--second_setting=--split=noniid", "--second_methods=fedpm,fedavg", *args)
    return started, code, tables


def test_the_strongest_baselines_are_the_methods_not_under_study():
    from experiments import compare
    from fedmask_jax.algorithms.registry import METHODS

    assert {m for m, spec in METHODS.items() if spec.studied} == {"fedpm", "klms"}
    rows = [{"method": m, "final_test_accuracy": a} for m, a in
            (("fedpm", 0.9), ("kaiming", 0.95), ("klms", 0.8), ("fedavg", 0.7), ("topk", 0.75), ("signsgd", 0.6))]
    rows.append({"method": "qsgd", "status": "failed"})  # unfinished: never chosen
    algorithms = {"fedpm": "fedpm", "kaiming": "fedpm", "klms": "klms", "fedavg": "fedavg", "topk": "topk",
                  "signsgd": "signsgd", "qsgd": "qsgd"}
    assert compare.strongest_baselines(rows, algorithms, 2) == ["topk", "fedavg"]


def test_parts_run_in_order_first_second_seeds_and_one_at_a_time(tmp_path, monkeypatch):
    first = ["fedpm", "fedavg", "signsgd"]
    second = ["noniid/fedpm", "noniid/fedavg"]
    seeds = ["fedpm@seed1", "fedavg@seed1"]  # fedavg: the strongest baseline
    started, code, _ = _fake_compare(monkeypatch, tmp_path / "all")
    assert (started, code) == ([*first, *second, *seeds], 0)
    # the parts one at a time, as scripts/conv4_comparison.sh runs them: each succeeds alone
    for part, expected in (("first", first), ("second", second), ("seeds", seeds)):
        started, code, tables = _fake_compare(monkeypatch, tmp_path / "parts", f"--parts={part}")
        assert (started, code) == (expected, 0), part
        if part == "first":  # the second setting's same-named entries have not run
            assert tables["noniid"] == {"fedpm": "not run", "fedavg": "not run"}
    # seeds before the first part: the strongest baselines are not known yet, so they wait
    started, code, _ = _fake_compare(monkeypatch, tmp_path / "early", "--parts=seeds")
    assert (started, code) == (["fedpm@seed1"], 1)
    started, code, _ = _fake_compare(monkeypatch, tmp_path / "none", "--report_only")
    assert (started, code) == ([], 1)
    started, code, _ = _fake_compare(monkeypatch, tmp_path / "bad", "--parts=first,third")
    assert code == 2


def test_the_seeds_table_averages_what_each_seed_recorded_and_counts_who_reached_the_target():
    from fedmask_jax import comparison

    def row(name, acc, rounds, mb, coded=None):
        r = {"method": name, "status": "done", "final_test_accuracy": acc, "best_test_accuracy": acc + 0.01,
             "mean_uplink_bpp": 1.0, "rounds_to_target": rounds, "uplink_mb_to_target": mb, "sim_time_s": 3.0}
        return r if coded is None else {**r, "mean_uplink_bpp_coded_prior": coded}

    rows = [row("a", 0.80, 4, 2.0, 0.5), row("a@seed1", 0.84, 6, 3.0, 0.7), row("a@seed2", 0.70, None, None, 0.6),
            row("b", 0.60, None, None), row("b@seed1", 0.62, None, None)]
    table = comparison.seeds_table(rows, {"a": ["a", "a@seed1", "a@seed2"], "b": ["b", "b@seed1"]})
    line_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    cells = [c.strip() for c in line_a.strip("|").split("|")]
    assert cells[:3] == ["a", "3", "0.7800 ± 0.0721"]
    # the cost to the target over the two seeds that reached it, saying so
    assert cells[-2:] == ["5.0 ± 1.4 (2/3 reached)", "2.50 ± 0.71 (2/3 reached)"]
    assert "0.6000 ± 0.1000" in cells  # the coded uplink, recorded by all three seeds
    line_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert line_b.endswith("| — (0/2 reached) | — (0/2 reached) |")


def test_a_figure_an_older_run_did_not_record_reads_not_recorded_not_unreached():
    from fedmask_jax import comparison

    base = {"status": "done", "final_test_accuracy": 0.8, "best_test_accuracy": 0.8, "mean_uplink_bpp": 1.0,
            "total_uplink_mb": 1.0, "rounds_to_target": None, "uplink_mb_to_target": None,
            "sim_time_to_target_s": None, "steady_round_time_s": 1.0}
    table = comparison.markdown_table([{**base, "method": "old", "sim_time_s": None},
                                       {**base, "method": "new", "sim_time_s": 40.0},
                                       {"method": "waiting", "status": "not run"}])
    sim = [h for _, h, _ in comparison.table_columns()].index("simulated s to target")
    cell = {line.split("|")[1].strip(): line.split("|")[1 + sim].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert cell == {"old": "n/r", "new": "—", "waiting": "—"}
    assert "n/r: not in that run's records" in table


def test_seed_curves_average_the_rounds_every_seed_evaluated(tmp_path):
    from fedmask_jax.plots import plot_seeds, seed_curves

    def run(name, accs):  # round -> accuracy; a round without one is not evaluated
        d = tmp_path / name
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for k, a in accs.items():
                rec = {"round": k, "cumulative_uplink_bits": 100.0 * k}
                f.write(json.dumps({**rec, **({"test_accuracy": a} if a is not None else {})}) + "\n")
        return str(d)

    dirs = [run("s0", {1: 0.2, 2: 0.4, 3: 0.6}), run("s1", {1: 0.4, 2: None, 3: 0.8})]
    xs, mean, std = seed_curves(dirs, "cumulative_uplink_bits")
    assert xs == [100.0, 300.0]
    assert mean == pytest.approx([0.3, 0.7]) and std == pytest.approx([0.1 * 2 ** 0.5] * 2)
    paths = plot_seeds({"fedavg": dirs}, str(tmp_path / "out"), target=0.5)
    assert [os.path.basename(p) for p in paths] == ["compare_seeds_accuracy.png", "compare_seeds_accuracy_vs_uplink.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_finished_records_are_brought_into_the_compare_dir_and_a_finished_run_there_is_kept(tmp_path, capsys):
    from experiments.compare import bring_finished

    source, target = tmp_path / "results", tmp_path / "runs"
    for rel, finished in (("fedpm", True), ("noniid/fedpm", True), ("klms", False), ("fedavg", True)):
        (source / rel).mkdir(parents=True)
        (source / rel / "metrics.jsonl").write_text(f'{{"round": 1, "from": "{rel}"}}\n')
        if finished:
            (source / rel / "summary.json").write_text("{}")
    (target / "fedavg").mkdir(parents=True)
    (target / "fedavg" / "summary.json").write_text('{"here": 1}')
    assert bring_finished(str(source), str(target)) == ["fedpm", "noniid/fedpm"]
    assert (target / "noniid" / "fedpm" / "metrics.jsonl").read_text() == '{"round": 1, "from": "noniid/fedpm"}\n'
    assert not (target / "klms").exists()  # no summary: not a finished run
    assert (target / "fedavg" / "summary.json").read_text() == '{"here": 1}' and not (target / "fedavg" / "metrics.jsonl").exists()
    bad = _compare_here(capsys, *SETTING, "--methods=fedpm", f"--finished_runs={tmp_path / 'nowhere'}",
                        f"--compare_dir={target}")
    assert bad.returncode == 2 and f"--finished_runs={tmp_path / 'nowhere'}: no such folder" in bad.stderr
