"""Per-layer convolution throughput on this host: the kernels that bound the Conv4 round.

    python -m experiments.bench_conv [--batch=128] [--out=runs/bench_conv.json]
    python -m experiments.bench_conv --clients=K [--batch=128] [--out=runs/bench_conv_kK.json]

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

``--clients=K`` (K > 0): the same layers for K clients at once, each with its own kernel (a
vmapped client chunk: the engine's scan strategy on accelerators). What is timed is one
training step of the layer for every client: the forward pass alone, and the step -- the
value and gradient of ``sum(g * relu(conv(x, w)))`` w.r.t. the input and the kernel, g a
random cotangent (so the step holds all three products: forward, input gradient, filter
gradient). Lowerings:

* ``vmap_grad`` -- the engine's ``client_grad=per_client``: each client's value_and_grad,
  vmapped (a grouped conv; its filter gradient a conv over transposed copies of the inputs);
* ``summed_grad`` -- ``client_grad=summed``: the vmapped losses summed, then one gradient (the
  filter gradient a ``batch_group_count=K`` conv on the inputs as they are);
* ``map_dense`` -- ``lax.map`` over the clients, dense convs inside a loop;
* ``unrolled`` -- a Python loop over the clients inside one jitted program;
* ``host_loop`` -- one jitted dense step per client, called K times from Python (the engine's
  host loop); its results are the reference every other lowering is checked against;
* ``im2col`` (14x14 layers only: the patches of a 28x28 layer at K=100 take 23 GB) -- the
  3x3 patches by slicing and concatenation, then one batched matmul over the clients
  (``einsum``), differentiated by JAX;
* ``shared_w_bound`` -- not a lowering: one kernel for all K x B images (a dense conv of batch
  K*B), the same FLOPs; what the per-client forms could reach at best.

Every lowering's losses, input and kernel gradients are checked against ``host_loop`` before
it is timed (relative max error, 1e-4 on CPU, 1e-2 on accelerators where f32 convolutions may
run in TF32); a lowering that disagrees stops the benchmark. FLOPs: 2*B*H*W*Cin*Cout*9 per
product per client, one product for the forward pass, three for the step.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import json
import os
import time
from typing import Callable

import numpy as np
from absl import app, flags

F = flags.FLAGS
flags.DEFINE_integer("batch", 128, "Batch size (per client with --clients).")
flags.DEFINE_integer("repeats", 5, "Timed repeats (the best is kept).")
flags.DEFINE_integer("clients", 0, "K > 0: each layer for K clients at once, each with its own "
                     "kernel, timed per lowering (vmap_grad, summed_grad, map_dense, unrolled, "
                     "host_loop, im2col); 0: the single-client table.", lower_bound=0)
flags.DEFINE_list("kinds", [], "With --clients: only these lowerings (default: all).")
flags.DEFINE_string("out", "runs/bench_conv.json", "Where the JSON goes ('' = nowhere); with "
                    "--clients and this flag not given, runs/bench_conv_k<K>.json.")

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


# --clients=K: lowerings of K clients' convolutions, each client with its own kernel.

IM2COL_MAX_SIZE = 14  # im2col's patches are 9x the input: only the 14x14 layers
STEP = "value_and_grad of sum(g * relu(conv(x, w))) w.r.t. x and w, g random (fwd + input grad + filter grad)"


def _conv(x, w):
    import jax

    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _layer_loss(conv: Callable):
    """One client's loss of the timed step: <g, relu(conv(x, w))>, g a random cotangent."""
    import jax
    import jax.numpy as jnp

    return lambda x, w, g: jnp.sum(g * jax.nn.relu(conv(x, w)))


def im2col_conv(x, w):
    """K clients' 'SAME' 3x3 convolutions, x [K, B, H, W, C], w [K, 3, 3, C, F]: the patches
    [K, B*H*W, 9C] (slices of the padded input, concatenated in the kernel's (dy, dx, c)
    order) times each client's kernel [K, 9C, F], one batched matmul."""
    import jax.numpy as jnp

    k, b, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, :, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
    y = jnp.einsum("kpc,kcf->kpf", patches.reshape(k, b * h * wd, 9 * c), w.reshape(k, 9 * c, -1))
    return y.reshape(k, b, h, wd, -1)


def client_lowerings(size: int, options: dict | None = None) -> dict[str, dict]:
    """Each lowering as {"forward": f(x, w) -> relu(conv) [K, ...], "step": f(x, w, g) ->
    (losses [K], (dx, dw)), "jit": whether to jit them (host_loop jits its per-client step
    with ``options`` and drives it from Python), "bound": not a per-client lowering}."""
    import jax
    import jax.numpy as jnp

    loss = _layer_loss(_conv)
    one_forward = lambda x, w: jax.nn.relu(_conv(x, w))  # noqa: E731
    one_step = jax.value_and_grad(loss, argnums=(0, 1))

    def summed_step(x, w, g):
        def total(x, w):
            losses = jax.vmap(loss)(x, w, g)
            return jnp.sum(losses), losses
        (_, losses), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, w)
        return losses, grads

    def unrolled(fn):
        def run(*args):
            outs = [fn(*(a[i] for a in args)) for i in range(args[0].shape[0])]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return run

    jit_forward = jax.jit(one_forward, compiler_options=options)
    jit_step = jax.jit(one_step, compiler_options=options)

    def host_loop(fn):
        def run(*args):
            outs = [fn(*(a[i] for a in args)) for i in range(args[0].shape[0])]
            return outs  # a list per client; stacked only for the check
        return run

    def shared(fn):  # every client's images through client 0's kernel, one dense conv
        def run(x, w, *rest):
            folded = [x.reshape(-1, *x.shape[2:]), w[0]] + [r.reshape(-1, *r.shape[2:]) for r in rest]
            return fn(*folded)
        return run

    kinds = {
        "vmap_grad": dict(forward=jax.vmap(one_forward), step=jax.vmap(one_step)),
        "summed_grad": dict(forward=jax.vmap(one_forward), step=summed_step),
        "map_dense": dict(forward=lambda x, w: jax.lax.map(lambda a: one_forward(*a), (x, w)),
                          step=lambda x, w, g: jax.lax.map(lambda a: one_step(*a), (x, w, g))),
        "unrolled": dict(forward=unrolled(one_forward), step=unrolled(one_step)),
        "host_loop": dict(forward=host_loop(jit_forward), step=host_loop(jit_step), jit=False),
    }
    if size <= IM2COL_MAX_SIZE:
        def im2col_step(x, w, g):
            def total(x, w):
                losses = jnp.sum(g * jax.nn.relu(im2col_conv(x, w)), axis=(1, 2, 3, 4))
                return jnp.sum(losses), losses
            (_, losses), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, w)
            return losses, grads

        kinds["im2col"] = dict(forward=lambda x, w: jax.nn.relu(im2col_conv(x, w)), step=im2col_step)
    kinds["shared_w_bound"] = dict(forward=shared(one_forward), step=shared(one_step), bound=True)
    return kinds


def _stacked(out):
    """A host-loop result (one output per client) as the other lowerings return it."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *out) if isinstance(out, list) else out


def _rel_error(a, b) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def check_lowering(kind: str, step_out, forward_out, reference, tolerance: float) -> float:
    """The largest relative error of a lowering's forward output, losses, input and kernel
    gradients against the reference's; raises if it exceeds ``tolerance``."""
    ref_forward, (ref_losses, (ref_dx, ref_dw)) = reference
    forward = _stacked(forward_out)
    losses, (dx, dw) = _stacked(step_out)
    pairs = {"forward": (forward, ref_forward), "loss": (losses, ref_losses), "input_grad": (dx, ref_dx),
             "filter_grad": (dw, ref_dw)}
    for name, (a, b) in pairs.items():
        if a.shape != b.shape:
            raise AssertionError(f"{kind}: {name} of shape {a.shape}, host_loop's {b.shape}: not timed")
    errors = {name: _rel_error(a, b) for name, (a, b) in pairs.items()}
    worst = max(errors.values())
    if not worst <= tolerance:
        raise AssertionError(f"{kind} disagrees with host_loop (relative max errors {errors}, "
                             f"tolerance {tolerance:g}): not timed")
    return worst


def default_tolerance(backend: str) -> float:
    return 1e-4 if backend == "cpu" else 1e-2


def client_rows(clients: int, batch: int, repeats: int, layers=None, kinds=None,
                tolerance: float | None = None, extra: dict[str, dict] | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (layer, lowering) for ``clients`` clients of ``batch`` images each.
    ``extra``: more lowerings (as ``client_lowerings`` gives them), checked and timed alike;
    ``on_row``: called with each row as soon as it is measured."""
    import jax

    from fedmask_jax import engine

    options = engine.compiler_options(engine.EngineConfig())
    if tolerance is None:
        tolerance = default_tolerance(jax.default_backend())
    rows = []
    for size, cin, cout in layers or LAYERS:
        kx, kw, kg = jax.random.split(jax.random.key(size * 1000 + cin + cout), 3)
        x = jax.random.normal(kx, (clients, batch, size, size, cin))
        w = jax.random.normal(kw, (clients, 3, 3, cin, cout)) * 0.05
        g = jax.random.normal(kg, (clients, batch, size, size, cout))
        lowerings = {**client_lowerings(size, options), **(extra or {})}
        if kinds:
            lowerings = {k: v for k, v in lowerings.items() if k in kinds or k == "host_loop"}
        ref = lowerings["host_loop"]
        host_args = [[a[i] for i in range(clients)] for a in (x, w, g)]  # sliced once, not timed
        reference = (_stacked(ref["forward"](x, w)), _stacked(ref["step"](x, w, g)))
        for kind, lowering in lowerings.items():
            if kinds and kind not in kinds:
                continue
            if lowering.get("jit", True):
                fwd = jax.jit(lowering["forward"], compiler_options=options)
                step = jax.jit(lowering["step"], compiler_options=options)
                args_f, args_s = (x, w), (x, w, g)
            else:  # host loop: per-client arrays prepared once, outside the timing
                fwd, step = _host_runner(lowering["forward"]), _host_runner(lowering["step"])
                args_f, args_s = host_args[:2], host_args
            bound = lowering.get("bound", False)
            if bound:
                err = None  # another computation (one kernel): nothing to compare with
            else:
                err = check_lowering(kind, step(*args_s), fwd(*args_f), reference, tolerance)
            t_fwd = _best(lambda: jax.block_until_ready(fwd(*args_f)), repeats)
            t_step = _best(lambda: jax.block_until_ready(step(*args_s)), repeats)
            rows.append(_client_row(kind, size, cin, cout, batch, clients, err, t_fwd, t_step, bound))
            if on_row:
                on_row(rows[-1])
        del x, w, g, host_args, reference
    return rows


def _host_runner(fn):
    """A host-loop lowering over per-client argument lists (already sliced)."""
    def run(*lists):
        return fn(*[_ListArg(a) for a in lists])
    return run


class _ListArg:
    """Per-client arrays that index like a stacked array (``a[i]``, ``a.shape[0]``)."""

    def __init__(self, items):
        self.items = items
        self.shape = (len(items),)

    def __getitem__(self, i):
        return self.items[i]


def _client_row(kind, size, cin, cout, batch, clients, err, t_fwd, t_step, bound) -> dict:
    flops = 2 * batch * size * size * 9 * cin * cout * clients  # one product, every client
    return {"kind": kind, "layer": f"{size}x{size}x{cin}->{cout}", "batch": batch, "clients": clients,
            "bound": bound, "max_rel_error_vs_host_loop": err, "step": STEP, "forward_ms": 1e3 * t_fwd,
            "step_ms": 1e3 * t_step, "forward_gflops": flops / t_fwd / 1e9,
            "step_gflops": 3 * flops / t_step / 1e9}


def main(argv):
    del argv
    if F.clients:
        out = F.out if F["out"].present else f"runs/bench_conv_k{F.clients}.json"
        rows = []

        def report(r):
            err = "—" if r["max_rel_error_vs_host_loop"] is None else f"{r['max_rel_error_vs_host_loop']:.1e}"
            print(f"{r['layer']:>16} {r['kind']:>14} (K={r['clients']}, B={r['batch']}): forward "
                  f"{r['forward_ms']:8.2f} ms ({r['forward_gflops']:6.0f} GFLOP/s), step (fwd + input "
                  f"grad + filter grad) {r['step_ms']:8.2f} ms ({r['step_gflops']:6.0f} GFLOP/s); "
                  f"max rel error {err}{'  [bound: one kernel for all clients]' if r['bound'] else ''}",
                  flush=True)
            rows.append(r)
            _write(rows, out)  # as it goes: a layer that runs out of memory keeps the others

        client_rows(F.clients, F.batch, F.repeats, kinds=F.kinds or None, on_row=report)
        return
    rows = jax_rows(F.batch, F.repeats) + torch_rows(F.batch, F.repeats)
    for r in sorted(rows, key=lambda r: (r["layer"], r["kind"])):
        print(f"{r['layer']:>16} {r['kind']:>12}: forward {r['forward_ms']:6.1f} ms "
              f"({r['forward_gflops']:4.0f} GFLOP/s), input grad {r['input_grad_ms']:6.1f} ms "
              f"({r['input_grad_gflops']:4.0f}), filter grad {r['filter_grad_ms']:6.1f} ms "
              f"({r['filter_grad_gflops']:4.0f}); all three {r['forward_backward_ms']:6.1f} ms",
              flush=True)
    _write(rows, F.out)


def _write(rows: list[dict], path: str) -> None:
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
