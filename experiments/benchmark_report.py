"""The parts of experiments/benchmark.py that define no flags, so that tests and other tools
can import them beside experiments.run's: the GEMM peak a case's achieved FLOP/s is set
against, and the tables it writes into docs/benchmarks.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time


def matmul_precision_label(backend: str, dtype: str = "float32") -> str:
    """What a ``dtype`` matmul at JAX's current default precision runs at on ``backend``."""
    import jax

    if dtype == "bfloat16":
        return "bf16"
    prec = jax.config.jax_default_matmul_precision
    if prec not in (None, "default", "fastest"):
        return f"f32 (jax_default_matmul_precision={prec})"
    return {"gpu": "f32 (TF32 on GPU)", "cuda": "f32 (TF32 on GPU)",
            "tpu": "f32 (bf16 passes on TPU)"}.get(backend, "f32")


def gemm_peak(backend: str | None = None, dtype: str = "float32", repeats: int = 5,
              size: int | None = None, chain: int | None = None) -> dict:
    """The GEMM peak the achieved FLOP/s is set against: the best of ``repeats`` timed calls
    (after a compiling warm-up call), each waited for with ``block_until_ready``.

    CPU: one 2048^3 matmul a call, as before (an 8192^3 one, 1.1 TFLOP, would take about 5 s
    at the ~215 GFLOP/s this 2-core CPU reaches, in every case's process).
    Accelerators: one program of 8 chained 8192^3 matmuls a call (x <- x @ b), so the device
    runs ~9 TFLOP between two host clock readings and dispatch latency is amortised; a
    single 2048^3 matmul (17 GFLOP) lasts tens of microseconds on an H200, about what one
    dispatch costs. The matmuls are in ``dtype`` at JAX's default precision, as the round's
    (float32, which on a GPU runs as TF32): ``gemm_peak_precision`` says which.
    """
    import math

    import jax
    import jax.numpy as jnp

    backend = backend or jax.default_backend()
    size = size or (2048 if backend == "cpu" else 8192)
    chain = chain or (1 if backend == "cpu" else 8)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
    b = (jax.random.normal(kb, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype)  # keeps x's scale
    if chain == 1:
        f = jax.jit(lambda a, b: a @ b)
    else:
        f = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda _, x: x @ b, a))
    f(a, b).block_until_ready()  # compile and warm up
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        seconds.append(time.perf_counter() - t)
    return {"gemm_peak_gflops": chain * 2 * size**3 / min(seconds) / 1e9, "gemm_peak_size": size,
            "gemm_peak_chain": chain, "gemm_peak_precision": matmul_precision_label(backend, dtype),
            "gemm_peak_seconds": seconds}


def gemm_label(r: dict) -> str:
    """'2048³ f32 matmul' or '8192³ f32 (TF32 on GPU) matmul, 8 chained in one program'."""
    size, chain = r.get("gemm_peak_size", 2048), r.get("gemm_peak_chain", 1)
    return (f"{size}³ {r.get('gemm_peak_precision', 'f32')} matmul"
            + (f", {chain} chained in one program" if chain > 1 else ""))


def f32_twin(case: str) -> str | None:
    """The float32 case a _bf16 case mirrors (None for a float32 case)."""
    return case[: -len("_bf16")] if case.endswith("_bf16") else None


def conv_op_types(hlo: str) -> dict[str, int]:
    """The convolutions of a compiled program's HLO text by kind and element types, e.g.
    ``{"__cudnn$convForward bf16,bf16->f32": 4}``: whether a bfloat16 convolution stayed one
    after XLA's passes (a backend may run a mixed-precision one in float32)."""
    import re

    types: dict[str, str] = {}
    ops = []
    define = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\(?([a-z]+[0-9]*)\[")
    call = re.compile(r"\b(convolution|custom-call)\(([^)]*)\)")
    for line in hlo.splitlines():
        m = define.match(line)
        if not m:
            continue
        types[m.group(1)] = m.group(2)
        c = call.search(line)
        if not c:
            continue
        kind = c.group(1)
        if kind == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if not target or "conv" not in target.group(1).lower():
                continue
            kind = target.group(1)
        args = re.sub(r"\[[^\]]*\]|\{[^}]*\}", "", c.group(2))  # shapes and layouts out
        ops.append((kind, m.group(2), [a.strip() for a in args.split(",") if a.strip()]))
    counts: dict[str, int] = {}
    for kind, out, args in ops:
        arg_types = []
        for a in args:  # "%name", or "f32 %name" where the printer gives operand types
            words = a.split()
            arg_types.append(words[0] if len(words) > 1 else types.get(words[0].lstrip("%"), "?"))
        key = f"{kind} {','.join(arg_types)}->{out}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def write_docs(results: list[dict], path: str, command: str) -> None:
    import jax

    try:
        import torch
        torch_v = torch.__version__
    except ImportError:
        torch_v = "not installed"
    header = (f"Measured {datetime.date.today()} on {platform.node() or 'this machine'} "
              f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), "
              f"backend {results[0]['backend']} ({results[0]['device']}), JAX {jax.__version__}, "
              f"PyTorch {torch_v} on "
              f"{', '.join(sorted({r['torch_device'] for r in results if r.get('torch_device')})) or '—'}. "
              f"XLA compiler options of the JAX side: "
              f"`{json.dumps(results[0].get('compiler_options') or {})}`. Command: `{command}`")
    rows = ["| case | strategy/chunk | JAX rounds/s | PyTorch rounds/s | speedup | JAX ex/s | "
            "achieved GFLOP/s | % of GEMM peak | compile s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    sweeps = [r for r in results if r.get("kind") == "sweep"]
    results = [r for r in results if r.get("kind") != "sweep"]
    for r in results:
        rows.append(
            f"| {r['case']} | {r['strategy']}/{r['client_chunk_size']} | {fmt(r['jax_rounds_per_s'], '.3f')} | "
            f"{fmt(r['torch_rounds_per_s'], '.3f')} | {fmt(r['speedup'])} | "
            f"{fmt(r['jax_examples_per_s'], '.0f')} | {fmt(r['achieved_gflops'], '.1f')} | "
            f"{fmt(100 * r['achieved_gflops'] / r['gemm_peak_gflops'], '.0f')} | "
            f"{fmt(r['compile_time_s'], '.1f')} | {fmt(r['peak_rss_mb'], '.0f')} |")
    borrowed = [r for r in results if r.get("torch_from")]
    if borrowed:
        rows.append("")
        rows.append("PyTorch rounds/s of " + ", ".join(f"{r['case']}: {r['torch_from']}'s (the same float32 "
                                                       "reference round, not timed again)" for r in borrowed) + ".")
    bf16 = [r for r in results if r.get("gemm_peak_precision") == "bf16"]
    if bf16:
        rows.append("")
        rows.append("% of GEMM peak of " + ", ".join(r["case"] for r in bf16) + ": of a bf16 matmul's "
                    f"({', '.join(format(r['gemm_peak_gflops'], '.0f') for r in bf16)} GFLOP/s).")
    if results:
        peaks = [r["gemm_peak_gflops"] for r in results if r.get("gemm_peak_precision") != "bf16"] or \
            [r["gemm_peak_gflops"] for r in results]
        span = f"{min(peaks):.0f}" if round(min(peaks)) == round(max(peaks)) else f"{min(peaks):.0f}–{max(peaks):.0f}"
        rows[:0] = [f"Training FLOPs per example: the analytic count of `fedmask_jax.flops` (forward + "
                    f"backward as executed), the same on every backend. GEMM peak: "
                    f"{gemm_label(results[0])}, timed in each case's process, best of 5 "
                    f"after a warm-up: {span} GFLOP/s.", ""]
    sweep_rows = ["Sweep cases: R FedPM runs (seeds and client learning rates differ) in one "
                  "program against one run at a time, steady rounds alternating (run-rounds/s: "
                  "runs advanced by one round per second).", "",
                  "| case | strategy/chunk | runs x clients mesh | runs vmapped at a time | one program "
                  "run-rounds/s | one at a time run-rounds/s (strategy) | speedup | compile s (one program / one run) "
                  "| peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
    sweep_rows += [f"| {r['case']} | {r['strategy']}/{r['client_chunk_size']} | "
                   f"{'x'.join(str(v) for v in r['mesh'].values())} | {r['runs_vectorized']} | "
                   f"{r['vectorized_run_rounds_per_s']:.3f} | "
                   f"{r['one_at_a_time_run_rounds_per_s']:.3f} ({r.get('one_at_a_time_strategy', 'scan')}) | "
                   f"{r['speedup']:.2f} | "
                   f"{r['compile_vectorized_s']:.1f} / {r['compile_one_s']:.1f} | {r['peak_rss_mb']:.0f} |"
                   for r in sweeps]
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    for marker, table, present in (("bench", rows, results), ("bench-sweep", sweep_rows, sweeps)):
        if not present:  # a run of other cases leaves this table as it was
            continue
        start_tag, end_tag = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        block = start_tag + "\n" + header + "\n\n" + "\n".join(table) + "\n" + end_tag
        start, end = text.find(start_tag), text.find(end_tag)
        if start < 0 or end < 0:
            text += "\n" + block + "\n"
        else:
            text = text[:start] + block + text[end + len(end_tag):]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
