"""Throughput of the JAX engine against the PyTorch reference, case by case.

    python -m experiments.benchmark --flagfile=experiments/configs/bench_cpu.flags

Each case runs in its own subprocess (so its peak memory is its own); inside it, the JAX
engine and the PyTorch reference train the same clients on the same data with the same local
epochs and batch size. Steady-state rounds (after compilation and one warm-up round) are
timed, JAX and PyTorch rounds alternating; a rate is one over the median round. Writes
<workdir>/benchmark.json and refreshes the table in docs/benchmarks.md.

The data is Fashion-MNIST, except for models benchmarked on another paper dataset's shape
(``SYNTHETIC``: Conv6, the paper's CIFAR-10 model), which train on generated uint8 images of
that shape (seeded numpy, uniform pixels and labels): the timing does not depend on what the
pixels are, and no archive is needed.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from absl import app, flags, logging

from experiments.benchmark_report import conv_op_types, f32_twin, fmt, gemm_label, gemm_peak, write_docs

F = flags.FLAGS
flags.DEFINE_list("cases", ["mlp_w1_k10", "mlp_w1_k100", "conv4_w1_k10"],
                  "Cases as <model>_w<width>_k<clients>[_n<population>][_r<runs>][_bf16]; width 05 "
                  "means 0.5; _r<runs> (a sweep case): that many runs in one program against one run "
                  "at a time (JAX only, --strategy=scan); _bf16: the JAX side's convolutions with "
                  "bfloat16 operands (--conv_precision=bf16 of experiments.run; the reference "
                  "stays float32), its GEMM peak a bfloat16 matmul.")
flags.DEFINE_integer("examples_per_client", 600, "Training examples per client (Fashion-MNIST, or generated images for conv6).")
flags.DEFINE_integer("batch_size", 128, "Local batch size (capped at examples_per_client).")
flags.DEFINE_integer("local_epochs", 3, "Local epochs.")
flags.DEFINE_integer("timed_rounds", 2, "Steady-state rounds timed per implementation (at least).")
flags.DEFINE_float("min_timed_seconds", 10.0, "Keep timing until each implementation's timed rounds add up to this many seconds (short rounds are noisy).")
flags.DEFINE_bool("torch", True, "Also time the PyTorch reference (needs the [bench] extra).")
flags.DEFINE_integer("torch_max_clients", 1000, "Skip the PyTorch reference above this cohort.")
flags.DEFINE_string("torch_device", "auto", "Device of the PyTorch reference: auto (cuda when torch sees a GPU, else cpu), cpu, cuda.")
flags.DEFINE_string("strategy", "auto", "Engine strategy for the JAX side.")
flags.DEFINE_integer("client_chunk_size", 0, "Clients vmapped together on the JAX side (0 = the engine's automatic choice).")
flags.DEFINE_string("client_grad", "auto", "Gradients of a vmapped chunk on the JAX side: per_client, summed or auto (--client_grad of experiments.run).")
flags.DEFINE_bool("cpu_ynn_fusions", False, "On CPU, keep XLA's YNNPACK fusions on the JAX side (jaxlib's default; the engine turns them off).")
flags.DEFINE_string("cpu_conv", "auto", "On CPU, the JAX side's convolution kernels: onednn, xla or auto (--cpu_conv of experiments.run).")
flags.DEFINE_string("data_dir", None, "TFDS data folder for Fashion-MNIST (default ~/tensorflow_datasets).")
flags.DEFINE_string("workdir", "runs/benchmark", "Where benchmark.json goes.")
flags.DEFINE_string("docs", "docs/benchmarks.md", "Markdown file whose table is refreshed ('' = none).")
flags.DEFINE_string("run_case", None, "Internal: run one case in this process and print JSON.")


def parse_case(case: str) -> dict:
    parts = case.split("_")
    spec = {"case": case, "model": parts[0], "width": 1.0, "k": 10, "n": None, "runs": 1,
            "conv_precision": "f32"}
    for p in parts[1:]:
        if p.startswith("w"):
            digits = p[1:]  # "w1" -> 1.0, "w05" -> 0.5, "w025" -> 0.25
            spec["width"] = float("0." + digits[1:]) if digits.startswith("0") else float(digits)
        elif p.startswith("k"):
            spec["k"] = int(p[1:])
        elif p.startswith("n"):
            spec["n"] = int(p[1:])
        elif p.startswith("r") and p[1:].isdigit() and int(p[1:]) > 1:
            spec["runs"] = int(p[1:])
        elif p == "bf16":
            spec["conv_precision"] = "bf16"
        else:
            raise ValueError(f"--cases: cannot parse {case!r} (part {p!r})")
    spec["n"] = spec["n"] or spec["k"]
    return spec


def time_rounds(**run_round) -> dict[str, list[float]]:
    """Seconds of rounds 1, 2, ... of each implementation (after their warm-up round 0),
    alternating between them round by round, until each has run at least --timed_rounds and
    for at least --min_timed_seconds.

    Alternating keeps the ratio honest on a shared host: this 2-vCPU VM has slow spells in
    which every round takes ~3.5x longer for a while (seen as a jump from 0.065 to 0.23 s per
    MLP round midway through one process), and a spell now hits both sides alike.
    """
    times = {name: [] for name in run_round}

    def done(ts):
        return len(ts) >= F.timed_rounds and sum(ts) >= F.min_timed_seconds

    while not all(done(ts) for ts in times.values()):
        for name, fn in run_round.items():
            if done(times[name]):
                continue
            t = time.perf_counter()
            fn(len(times[name]) + 1)
            times[name].append(time.perf_counter() - t)
    return times


def rate(times: list[float]) -> float:
    """Rounds per second from the median round, so that a slow spell of the host shorter
    than half the timed rounds does not set the figure."""
    return 1.0 / float(np.median(times))


# Models benchmarked on generated images: model -> (the dataset whose shape they take, input
# shape, classes). Conv6 is the paper's CIFAR-10 model.
SYNTHETIC = {"conv6": ("cifar10", (32, 32, 3), 10)}
SYNTHETIC_TEST_EXAMPLES = 512  # the evaluation program is built, not timed


def synthetic_dataset(name: str, shape: tuple[int, ...], num_classes: int, num_train: int, seed: int = 0):
    """Generated uint8 images of ``shape`` with uniform labels (seeded numpy)."""
    from fedmask_jax.data import Dataset

    rng = np.random.default_rng(seed)
    images = lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)  # noqa: E731
    labels = lambda n: rng.integers(0, num_classes, n).astype(np.int64)  # noqa: E731
    return Dataset(f"synthetic_{name}", images(num_train), labels(num_train),
                   images(SYNTHETIC_TEST_EXAMPLES), labels(SYNTHETIC_TEST_EXAMPLES), num_classes)


def case_dataset(spec: dict):
    """A case's data: Fashion-MNIST, or generated images for the models in ``SYNTHETIC``
    (enough for every client to hold --examples_per_client)."""
    if spec["model"] in SYNTHETIC:
        name, shape, classes = SYNTHETIC[spec["model"]]
        return synthetic_dataset(name, shape, classes, spec["n"] * F.examples_per_client)
    from fedmask_jax.data import load_dataset

    return load_dataset("fashion_mnist", data_dir=F.data_dir, download=False)


def case_config(spec: dict, batch_size: int):
    """The run a case times: the case's data (``case_dataset``), model, width and cohort,
    FedPM with the reference's settings, engine only (no host-side coding check)."""
    from fedmask_jax.run_config import RunConfig

    dataset = SYNTHETIC[spec["model"]][0] if spec["model"] in SYNTHETIC else "fashion_mnist"
    return RunConfig(dataset=dataset, model=spec["model"], width=spec["width"],
                     num_clients=spec["n"], clients_per_round=spec["k"], local_epochs=F.local_epochs,
                     batch_size=batch_size, max_examples_per_client=F.examples_per_client,
                     strategy=F.strategy, client_chunk_size=F.client_chunk_size,
                     client_grad=F.client_grad, cpu_ynn_fusions=F.cpu_ynn_fusions, cpu_conv=F.cpu_conv,
                     conv_precision=spec.get("conv_precision", "f32"), data_dir=F.data_dir,
                     download=False, verbose=False, method={"coded_uplink": False})


def run_case(case: str) -> dict:
    import jax

    from fedmask_jax import engine, experiment, federation, flops
    from fedmask_jax.data import partition

    spec = parse_case(case)
    if spec["runs"] > 1:
        return run_sweep_case(spec)
    ds = case_dataset(spec)
    sizes = [len(p) for p in partition(ds.y_train, spec["n"], "iid", seed=0,
                                       max_examples_per_client=F.examples_per_client)]
    per_client = min(sizes)
    batch = min(F.batch_size, per_client)
    exp = experiment.build(case_config(spec, batch), dataset=ds)
    parts, backend = exp.runs[0].partition, jax.default_backend()
    server, store = exp.initial_state()
    compile_s = exp.round_fn.compile(server, store, exp.data, exp.cohort(0), exp.round_key(0))
    compiled = exp.round_fn.compiled  # the scan strategy's one program
    conv_ops = conv_op_types(compiled.as_text()) if compiled is not None and exp.architecture.conv else None
    out = exp.round_fn(server, store, exp.data, exp.cohort(0), exp.round_key(0))  # warm-up
    jax.block_until_ready(out.metrics)
    state = [out.server, out.store]

    def jax_round(r):
        out = exp.round_fn(state[0], state[1], exp.data, exp.cohort(r), exp.round_key(r))
        state[0], state[1] = out.server, out.store
        jax.block_until_ready(out.metrics)

    examples_per_round = F.local_epochs * sum(len(parts[c]) for c in federation.sample_cohort(0, 1, spec["n"], spec["k"]))
    flops_ex = flops.train_flops_per_example(exp.architecture)  # analytic: the same on every backend
    jax_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rounds = {"jax": jax_round}
    strategy, chunk, cfg = exp.strategy, exp.engine_config.client_chunk_size, exp.engine_config

    torch_device = None
    if F.torch and spec["k"] <= F.torch_max_clients:
        import torch

        from fedmask_jax.reference import torch_fedpm

        torch_device = F.torch_device if F.torch_device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        fed = torch_fedpm.TorchFedPM(spec["model"], ds.input_shape, ds.num_classes, width=spec["width"],
                                     device=torch_device)
        xs = [(torch_fedpm.to_torch_input(ds.x_train[p]), torch.from_numpy(ds.y_train[p].astype(np.int64)))
              for p in parts]
        fed.round(xs, federation.sample_cohort(0, 0, spec["n"], spec["k"]), F.local_epochs, batch)  # warm-up
        rounds["torch"] = lambda r: fed.round(
            xs, federation.sample_cohort(0, r, spec["n"], spec["k"]), F.local_epochs, batch)

    times = time_rounds(**rounds)
    jax_times, torch_times = times["jax"], times.get("torch")
    jax_rps = rate(jax_times)
    torch_rps = rate(torch_times) if torch_times else None

    achieved = flops_ex * examples_per_round * jax_rps / 1e9
    precision = spec["conv_precision"]
    peak = gemm_peak(backend, dtype="bfloat16" if precision == "bf16" else "float32")
    return {
        "case": case, "model": spec["model"], "width": spec["width"],
        "clients_per_round": spec["k"], "num_clients": spec["n"],
        "examples_per_client": per_client, "batch_size": batch, "local_epochs": F.local_epochs,
        "dataset": ds.name, "strategy": strategy, "client_chunk_size": chunk,
        "client_grad": cfg.client_grad, "backend": backend,
        "compiler_options": engine.compiler_options(cfg) or {},
        "conv_kernel": _conv_kernel(exp.architecture, backend),
        "conv_precision": precision, "conv_ops": conv_ops,
        "device": str(jax.devices()[0].device_kind),
        "jax_rounds_per_s": jax_rps, "jax_examples_per_s": examples_per_round * jax_rps,
        "torch_rounds_per_s": torch_rps, "torch_device": torch_device,
        "torch_examples_per_s": examples_per_round * torch_rps if torch_rps else None,
        "speedup": jax_rps / torch_rps if torch_rps else None,
        "jax_round_seconds": jax_times, "torch_round_seconds": torch_times,
        "compile_time_s": compile_s,
        "train_gflop_per_example": flops_ex / 1e9,
        "forward_gflop_per_example": flops.forward_flops_per_example(exp.architecture) / 1e9,
        "flop_count": "analytic (fedmask_jax.flops): forward + backward as executed",
        "achieved_gflops": achieved,
        **peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jax_peak_rss_mb": jax_rss,
    }


def _conv_kernel(arch, backend: str) -> str | None:
    """Which convolution kernels the JAX side ran (None for models without convolutions)."""
    from fedmask_jax import conv
    from fedmask_jax.kernels import onednn

    if not arch.conv:
        return None
    if conv.conv_precision() == "bf16":
        return "xla (bf16 operands)"  # oneDNN's kernel is float32-only
    if backend == "cpu" and conv.cpu_kernel() == "onednn":
        return f"onednn {onednn.version()}"
    return "xla"


def run_sweep_case(spec: dict) -> dict:
    """``runs`` FedPM runs (seeds 0.., client learning rates spread around the reference's)
    in one program (scan strategy), against one of them alone (the strategy a single run
    gets): run-rounds per second of each, steady rounds alternating, and the compile time of
    each program."""
    import jax

    from fedmask_jax import engine, experiment

    ds = case_dataset(spec)
    alone = case_config(spec, min(F.batch_size, F.examples_per_client))
    base = alone.replace(strategy="scan" if F.strategy == "auto" else F.strategy)  # runs share scan only
    cfgs = [base.replace(seed=i, method={**base.method, "client_lr": 0.1 * 2 ** ((i % 4) - 1.5)})
            for i in range(spec["runs"])]
    # One run at a time runs as a single run would: --strategy auto picks its strategy.
    programs = {"vectorized": experiment.build(cfgs, dataset=ds), "one_at_a_time": experiment.build(alone, dataset=ds)}
    states, compile_s = {}, {}
    for name, exp in programs.items():
        server, store = exp.initial_state()
        compile_s[name] = exp.round_fn.compile(server, store, exp.data, exp.cohort(0), exp.round_key(0))
        out = exp.round_fn(server, store, exp.data, exp.cohort(0), exp.round_key(0))  # warm-up
        jax.block_until_ready(out.metrics)
        states[name] = [out.server, out.store]

    def stepper(name):
        exp, state = programs[name], states[name]

        def step(r):
            out = exp.round_fn(state[0], state[1], exp.data, exp.cohort(r), exp.round_key(r))
            state[0], state[1] = out.server, out.store
            jax.block_until_ready(out.metrics)
        return step

    times = time_rounds(**{name: stepper(name) for name in programs})
    vec = spec["runs"] * rate(times["vectorized"])
    one = rate(times["one_at_a_time"])
    exp = programs["vectorized"]
    return {
        "case": spec["case"], "kind": "sweep", "model": spec["model"], "width": spec["width"],
        "runs": spec["runs"], "clients_per_round": spec["k"], "num_clients": spec["n"],
        "examples_per_client": F.examples_per_client, "batch_size": base.batch_size,
        "local_epochs": F.local_epochs, "strategy": exp.strategy,
        "client_chunk_size": exp.engine_config.client_chunk_size,
        "client_grad": exp.engine_config.client_grad, "dataset": ds.name,
        "mesh": dict(exp.mesh.shape), "runs_vectorized": exp.engine_config.runs_vectorized,
        "compiler_options": engine.compiler_options(exp.engine_config) or {}, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "one_at_a_time_strategy": programs["one_at_a_time"].strategy,
        "vectorized_run_rounds_per_s": vec, "one_at_a_time_run_rounds_per_s": one,
        "speedup": vec / one,
        "vectorized_round_seconds": times["vectorized"], "one_at_a_time_round_seconds": times["one_at_a_time"],
        "compile_vectorized_s": compile_s["vectorized"], "compile_one_s": compile_s["one_at_a_time"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if F.run_case:
        print("RESULT " + json.dumps(run_case(F.run_case)), flush=True)
        return
    from fedmask_jax.outputs import ensure_writable_dir, write_json_atomic

    for c in F.cases:
        parse_case(c)  # fail early on a bad name
    workdir = ensure_writable_dir(F.workdir)
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--cases", "--flagfile"))]
    passthrough += [f"--{n}={getattr(F, n)}" for n in ("examples_per_client", "batch_size",
                    "local_epochs", "timed_rounds", "min_timed_seconds", "torch",
                    "torch_max_clients", "strategy", "torch_device", "client_chunk_size", "client_grad",
                    "cpu_ynn_fusions", "cpu_conv")]
    passthrough += [f"--data_dir={F.data_dir}"] if F.data_dir else []
    results = []
    for case in F.cases:
        print(f"benchmark: {case} ...", flush=True)
        # A _bf16 case whose float32 twin is among the cases does not time the reference again
        # (the same float32 PyTorch round): its speedup is set against the twin's reference.
        twin = f32_twin(case)
        extra = ["--notorch"] if twin in F.cases else []
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", f"--run_case={case}",
                               *passthrough, *extra], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"benchmark: {case} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        done = {x["case"]: x for x in results}
        if extra and done.get(twin, {}).get("torch_rounds_per_s"):
            t = done[twin]
            r.update(torch_rounds_per_s=t["torch_rounds_per_s"], torch_device=t["torch_device"],
                     torch_examples_per_s=t["torch_examples_per_s"], torch_from=twin,
                     speedup=r["jax_rounds_per_s"] / t["torch_rounds_per_s"])
        results.append(r)
        if r.get("kind") == "sweep":
            print(f"  {r['runs']} runs in one program: {r['vectorized_run_rounds_per_s']:.3f} run-rounds/s, "
                  f"one at a time {r['one_at_a_time_run_rounds_per_s']:.3f}, speedup {r['speedup']:.2f}, "
                  f"compile {r['compile_vectorized_s']:.1f}s vs {r['compile_one_s']:.1f}s", flush=True)
            write_json_atomic(os.path.join(workdir, "benchmark.json"), results)
            continue
        if r.get("conv_ops"):
            print("  convolutions in the round: " + ", ".join(f"{n}x {k}" for k, n in sorted(r["conv_ops"].items())), flush=True)
        print(f"  JAX {r['jax_rounds_per_s']:.3f} rounds/s ({r['jax_examples_per_s']:.0f} ex/s, "
              f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['achieved_gflops'] / r['gemm_peak_gflops']:.0f}% "
              f"of the {r['gemm_peak_gflops']:.0f} GFLOP/s GEMM peak, {gemm_label(r)}), PyTorch {fmt(r['torch_rounds_per_s'], '.3f')} "
              f"rounds/s, speedup {fmt(r['speedup'])}, compile {r['compile_time_s']:.1f}s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        write_json_atomic(os.path.join(workdir, "benchmark.json"), results)
    if results and F.docs:
        write_docs(results, F.docs, "python -m experiments.benchmark " + " ".join(sys.argv[1:]))
    if len(results) < len(F.cases):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
