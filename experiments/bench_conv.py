"""Per-layer convolution throughput on this host: the kernels that bound the Conv4 round.

    python -m experiments.bench_conv [--batch=128] [--out=runs/bench_conv.json]

For each 3x3 'same' convolution of Conv4 at batch 128 (NHWC), times the forward pass and the
forward pass with both gradients, for:

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


def jax_rows(batch: int, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    from fedmask_jax import engine

    # The engine's compiler options (YNNPACK fusions off on CPU), and jaxlib's defaults.
    ours = engine.compiler_options(engine.EngineConfig())
    kinds = {"xla": (xla, ours), "xla_ynn": (xla, None),
             "winograd_f2": (lambda x, w: winograd_conv3x3(x, w, 2), ours),
             "winograd_f4": (lambda x, w: winograd_conv3x3(x, w, 4), ours)}
    if ours is None:  # not on CPU: the two XLA rows would be the same program
        del kinds["xla_ynn"]
    rows = []
    for size, cin, cout in LAYERS:
        x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.05
        reference = xla(x, w)
        for kind, (conv, options) in kinds.items():
            fwd = jax.jit(conv, compiler_options=options)
            both = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w)), argnums=(0, 1)),
                           compiler_options=options)
            err = float(jnp.abs(fwd(x, w) - reference).max() / jnp.abs(reference).max())
            rows.append(_row(kind, size, cin, cout, batch, err,
                             _best(lambda: jax.block_until_ready(fwd(x, w)), repeats),
                             _best(lambda: jax.block_until_ready(both(x, w)), repeats)))
    return rows


def torch_rows(batch: int, repeats: int) -> list[dict]:
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError:
        return []
    rows = []
    for size, cin, cout in LAYERS:
        x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = (torch.randn(cout, cin, 3, 3) * 0.05).requires_grad_()

        def fwd():
            with torch.no_grad():
                tf.conv2d(x, w, padding=1)

        def both():
            tf.conv2d(x, w, padding=1).sum().backward()

        rows.append(_row("torch", size, cin, cout, batch, None, _best(fwd, repeats),
                         _best(both, repeats)))
    return rows


def _row(kind, size, cin, cout, batch, err, t_fwd, t_both) -> dict:
    flops = 2 * batch * size * size * 9 * cin * cout
    return {"kind": kind, "layer": f"{size}x{size}x{cin}->{cout}", "batch": batch,
            "max_rel_error_vs_xla": err, "forward_ms": 1e3 * t_fwd,
            "forward_backward_ms": 1e3 * t_both, "forward_gflops": flops / t_fwd / 1e9,
            "forward_backward_gflops": 3 * flops / t_both / 1e9}


def main(argv):
    del argv
    rows = jax_rows(F.batch, F.repeats) + torch_rows(F.batch, F.repeats)
    for r in sorted(rows, key=lambda r: (r["layer"], r["kind"])):
        print(f"{r['layer']:>16} {r['kind']:>12}: forward {r['forward_ms']:7.1f} ms "
              f"({r['forward_gflops']:5.0f} GFLOP/s), forward+backward "
              f"{r['forward_backward_ms']:7.1f} ms ({r['forward_backward_gflops']:5.0f} GFLOP/s)",
              flush=True)
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
