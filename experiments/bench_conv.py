"""Per-layer convolution throughput on this host: the kernels that bound the Conv4 round.

    python -m experiments.bench_conv [--batch=128] [--out=runs/bench_conv.json]

For each 3x3 'same' convolution of Conv4 at batch 128 (NHWC), times the three products of a
training step one by one -- the forward pass, the input gradient and the filter gradient
(against a random output cotangent) -- for:

* ``xla`` -- ``lax.conv_general_dilated``, what the models use, compiled as the engine
  compiles it (``engine.compiler_options``: on CPU, XLA's own kernels, YNNPACK fusions off);
* ``xla_ynn`` -- the same with jaxlib's default options (CPU only: YNNPACK fusions on);
* ``winograd_f2`` / ``winograd_f4`` -- Winograd F(2x2,3x3) and F(4x4,3x3) (Lavin & Gray 2016)
  written in XLA ops (tile slices, transforms, one batched matmul), a form that trades
  multiplies for memory passes; kept here as a measured alternative, not used by the models;
* ``torch`` -- PyTorch's convolution (oneDNN on CPU), channels-last, when torch is installed.

Prints one line per (layer, kind) and writes them as JSON. Figures are quoted in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

F = flags.FLAGS
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (the best is kept).")
flags.DEFINE_string("out", "runs/bench_conv.json", "Where the JSON goes ('' = nowhere).")

# (spatial size, input channels, output channels) of Conv4's layers 2-4 on 28x28 inputs.
LAYERS = [(28, 64, 64), (14, 64, 128), (14, 128, 128)]

# Winograd transforms (Lavin & Gray 2016): output tile m, input tile m + 2.
WINOGRAD = {
    2: dict(AT=[[1, 1, 1, 0], [0, 1, -1, -1]],
            G=[[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
            BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    4: dict(AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
            G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
            BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
}


def _combination(coefficients, arrays):
    """sum_i c_i * a_i with the zero terms skipped and +-1 as add/subtract."""
    out = None
    for c, a in zip(coefficients, arrays):
        if c == 0:
            continue
        term = a if c == 1 else (-a if c == -1 else a * np.float32(c))
        out = term if out is None else out + term
    return out


def winograd_conv3x3(x, w, m: int):
    """'SAME' stride-1 3x3 convolution, NHWC x HWIO, by Winograd F(m x m, 3 x 3)."""
    import jax.numpy as jnp

    at, g, bt = (np.asarray(WINOGRAD[m][k], np.float64) for k in ("AT", "G", "BT"))
    tile = m + 2
    b, h, wd, c = x.shape
    nh, nw = -(-h // m), -(-wd // m)
    xp = jnp.pad(x, ((0, 0), (1, m * nh + 1 - h), (1, m * nw + 1 - wd), (0, 0)))
    d = [[xp[:, u:u + m * nh:m, v:v + m * nw:m, :] for v in range(tile)] for u in range(tile)]
    t = [[_combination(bt[a], [d[u][v] for u in range(tile)]) for v in range(tile)]
         for a in range(tile)]
    v = jnp.stack([_combination(bt[j], [t[i][k] for k in range(tile)])
                   for i in range(tile) for j in range(tile)]).reshape(tile * tile, b * nh * nw, c)
    gj = jnp.asarray(g, jnp.float32)
    u = jnp.einsum("au,uvcf,bv->abcf", gj, w, gj).reshape(tile * tile, c, w.shape[-1])
    prod = jnp.einsum("kpc,kcf->kpf", v, u)
    rows = [[_combination(at[r], [prod[i * tile + j] for i in range(tile)]) for j in range(tile)]
            for r in range(m)]
    y = jnp.stack([jnp.stack([_combination(at[s], rows[r]) for s in range(m)]) for r in range(m)])
    y = y.reshape(m, m, b, nh, nw, -1).transpose(2, 3, 0, 4, 1, 5).reshape(b, m * nh, m * nw, -1)
    return y[:, :h, :wd, :]


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _layer_inputs(batch, size, cin, cout):
    """Input, kernel and a random output cotangent (numpy, NHWC / HWIO), the same for all kinds.

    The cotangent is random on purpose: the gradient of ``sum(conv(x, w))`` has an all-ones
    cotangent that XLA simplifies, which made XLA's backward look 1.4x faster than it is.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05
    g = rng.standard_normal((batch, size, size, cout), np.float32)
    return x, w, g


def jax_rows(batch: int, repeats: int) -> list[dict]:
    import jax

    from fedmask_jax import engine

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # The engine's compiler options (YNNPACK fusions off on CPU), and jaxlib's defaults.
    ours = engine.compiler_options(engine.EngineConfig())
    kinds = {"xla": (xla, ours), "xla_ynn": (xla, None),
             "winograd_f2": (lambda x, w: winograd_conv3x3(x, w, 2), ours),
             "winograd_f4": (lambda x, w: winograd_conv3x3(x, w, 4), ours)}
    if ours is None:  # not on CPU: the two XLA rows would be the same program
        del kinds["xla_ynn"]
    rows = []
    for size, cin, cout in LAYERS:
        x, w, g = (jax.device_put(a) for a in _layer_inputs(batch, size, cin, cout))
        reference = xla(x, w)
        for kind, (conv, options) in kinds.items():
            jit = lambda f: jax.jit(f, compiler_options=options)  # noqa: E731
            fwd = jit(conv)
            input_grad = jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
            filter_grad = jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
            err = float(abs(fwd(x, w) - reference).max() / abs(reference).max())
            time_of = lambda f: _best(lambda: jax.block_until_ready(f(x, w, g)), repeats)  # noqa: E731
            rows.append(_row(kind, size, cin, cout, batch, err,
                             _best(lambda: jax.block_until_ready(fwd(x, w)), repeats),
                             time_of(input_grad), time_of(filter_grad)))
    return rows


def torch_rows(batch: int, repeats: int) -> list[dict]:
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError:
        return []
    rows = []
    for size, cin, cout in LAYERS:
        x, w, g = _layer_inputs(batch, size, cin, cout)
        to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731  channels-last
        x, g = to_nchw(x), to_nchw(g)
        w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        with torch.no_grad():
            t_fwd = _best(lambda: tf.conv2d(x, w, padding=1), repeats)
            # The two backward kernels the autograd engine calls, one at a time.
            grad = torch.ops.aten.convolution_backward
            args = (g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
            t_dx = _best(lambda: grad(*args, [True, False, False]), repeats)
            t_dw = _best(lambda: grad(*args, [False, True, False]), repeats)
        rows.append(_row("torch", size, cin, cout, batch, None, t_fwd, t_dx, t_dw))
    return rows


def _row(kind, size, cin, cout, batch, err, t_fwd, t_dx, t_dw) -> dict:
    flops = 2 * batch * size * size * 9 * cin * cout  # each of the three products
    total = t_fwd + t_dx + t_dw
    return {"kind": kind, "layer": f"{size}x{size}x{cin}->{cout}", "batch": batch,
            "max_rel_error_vs_xla": err, "forward_ms": 1e3 * t_fwd,
            "input_grad_ms": 1e3 * t_dx, "filter_grad_ms": 1e3 * t_dw,
            "forward_backward_ms": 1e3 * total,
            "forward_gflops": flops / t_fwd / 1e9, "input_grad_gflops": flops / t_dx / 1e9,
            "filter_grad_gflops": flops / t_dw / 1e9, "forward_backward_gflops": 3 * flops / total / 1e9}


def main(argv):
    del argv
    rows = jax_rows(F.batch, F.repeats) + torch_rows(F.batch, F.repeats)
    for r in sorted(rows, key=lambda r: (r["layer"], r["kind"])):
        print(f"{r['layer']:>16} {r['kind']:>12}: forward {r['forward_ms']:6.1f} ms "
              f"({r['forward_gflops']:4.0f} GFLOP/s), input grad {r['input_grad_ms']:6.1f} ms "
              f"({r['input_grad_gflops']:4.0f}), filter grad {r['filter_grad_ms']:6.1f} ms "
              f"({r['filter_grad_gflops']:4.0f}); all three {r['forward_backward_ms']:6.1f} ms",
              flush=True)
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
