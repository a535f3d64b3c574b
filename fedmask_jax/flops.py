"""Training FLOPs per example, counted from the architecture's shapes alone.

    python -m fedmask_jax.flops            # the four paper settings, layer by layer
    python -m fedmask_jax.flops --xla      # ... and XLA:CPU's own count beside each

Why not XLA's ``cost_analysis()``: on a GPU, XLA turns every convolution into a cuDNN custom
call, and its cost analysis counts zero FLOPs for a custom call, so a Conv4 step "costs" a
few percent of what it computes (docs/benchmarks.md); on the CPU the same happens to the
convolutions ``fedmask_jax.conv`` hands to oneDNN. The count here is the same number on
every backend. It follows the convention of XLA's CPU count, which counts every op, and it
matches that count of the forward pass to 0.001% (``tests/test_flops.py``):

* a multiply-add is 2 FLOPs;
* a 3x3 'same' convolution counts only the taps that fall inside the image: per spatial
  dimension of size n, 3n - 2 (output position, tap) pairs, not 3n (the border taps over the
  zero padding are not multiplied);
* the elementwise ops of a forward pass, each 1 FLOP per element: bias add, ReLU, the
  input's normalisation ((x / 255 - 0.5) / 0.5 after a conversion: 4 per pixel), and a 2x2
  max-pool's 3 comparisons per window;
* not counted: work done once per step for the whole batch, per parameter rather than per
  example, so that its share depends on the batch size: drawing the mask (random bits, a
  sigmoid and a comparison per entry; XLA:CPU counts 57 ops an entry, mostly the integer
  ops of the random bits) and multiplying it into the frozen weights, the mask's gradient
  and the optimizer's update. At batch 128 the mask draw alone would add 22% to the MLP's
  forward count and 0.6% to Conv4's. Nor the loss (softmax cross-entropy, about 80 FLOPs an
  example).

Training is the forward pass plus the backward pass *as it is executed*: for every conv and
dense layer, the weight-gradient product (the same FLOPs as its forward product) and the
input-gradient product (likewise), except the first layer's input gradient, which nothing
needs (the input is data) and which JAX does not compute; plus, per element, the ReLU's
gradient (a select), the bias gradient (a sum) and the max-pool's (4 per input element:
comparison with the window's maximum, which tap is first, a select). This is *not* 3x the
forward. For the conv nets the two agree to 0.5% (the first conv is small), but the MLP's
first layer holds 88% of its multiply-adds, so 3x the forward overstates an MLP step by 42%;
XLA:CPU's own count of a compiled training step agrees with this one to 0.13% for all four
paper models (``xla_cpu_flops_per_example(..., train=True)``; its count is a little higher because its
fusion pass recomputes some elementwise ops, e.g. a bias add inside the ReLU gradient's
fusion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

from fedmask_jax import models

# The paper's settings (experiments/configs): model -> (input shape, classes).
STANDARD = {
    "mlp": ((28, 28, 1), 10),
    "conv4": ((28, 28, 1), 10),
    "conv6": ((32, 32, 3), 10),
    "conv10": ((32, 32, 3), 100),
}


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One stage of the network, per example.

    ``macs``: multiply-adds of its product (conv or dense; 0 for the others);
    ``forward_elementwise``: bias add + ReLU, the pool's comparisons, the normalisation;
    ``input_grad``, ``weight_grad``: the backward products (2 FLOPs a multiply-add);
    ``backward_elementwise``: ReLU gradient + bias gradient, or the pool's gradient.
    """

    name: str
    kind: str  # "normalize", "conv3x3", "maxpool2x2", "dense"
    shape: str  # e.g. "28x28x1 -> 28x28x64"
    macs: int
    forward_elementwise: int
    input_grad: int
    weight_grad: int
    backward_elementwise: int

    @property
    def forward(self) -> int:
        return 2 * self.macs + self.forward_elementwise

    @property
    def backward(self) -> int:
        return self.input_grad + self.weight_grad + self.backward_elementwise

    @property
    def train(self) -> int:
        return self.forward + self.backward


def in_image_taps(n: int, k: int = 3) -> int:
    """(output position, tap) pairs of a k-wide 'same' stride-1 window over n positions whose
    tap falls inside the image: 3n - 2 for k = 3 (n >= 2)."""
    lo = (k - 1) // 2  # XLA's / JAX's 'SAME': the smaller half of the padding goes first
    return sum(1 for o in range(n) for t in range(k) if 0 <= o + t - lo < n)


def _shape(*dims: int) -> str:
    return "x".join(str(d) for d in dims)


def layers(arch: models.Architecture) -> list[LayerFlops]:
    """The per-example count of ``arch``, stage by stage, as ``models.py`` builds it."""
    out: list[LayerFlops] = []
    first_product = [True]

    def product(name, kind, shape, macs, n_out, act: bool):
        """A conv or dense layer with its bias (and ReLU when ``act``); ``n_out`` outputs."""
        ew = n_out * (2 if act else 1)
        in_grad = 0 if first_product[0] else 2 * macs
        first_product[0] = False
        out.append(LayerFlops(name, kind, shape, macs, ew, in_grad, 2 * macs, ew))

    pixels = math.prod(arch.input_shape)
    out.append(LayerFlops("input", "normalize", f"{_shape(*arch.input_shape)} uint8 -> f32",
                          0, 4 * pixels, 0, 0, 0))
    if arch.conv:
        h, w, c = arch.input_shape  # NHWC images
        for i, width in enumerate(models._CONV_WIDTHS[arch.name]):
            f = models._scaled(width, arch.width)
            macs = in_image_taps(h) * in_image_taps(w) * c * f
            product(f"conv{i + 1}", "conv3x3", f"{_shape(h, w, c)} -> {_shape(h, w, f)}",
                    macs, h * w * f, act=True)
            c = f
            if i % 2 == 1:  # 2x2 / stride-2 max-pool, floor for odd sizes
                ho, wo = h // 2, w // 2
                out.append(LayerFlops(f"pool{i // 2 + 1}", "maxpool2x2",
                                      f"{_shape(h, w, c)} -> {_shape(ho, wo, c)}",
                                      0, 3 * ho * wo * c, 0, 0, 4 * (2 * ho) * (2 * wo) * c))
                h, w = ho, wo
        fan_in = h * w * c
        hidden = [models._scaled(d, arch.width) for d in models._CONV_DENSE]
    else:
        fan_in = pixels
        hidden = [models._scaled(d, arch.width) for d in arch.mlp_hidden]
    for j, d in enumerate([*hidden, arch.num_classes]):
        last = j == len(hidden)
        product(f"dense{j + 1}", "dense", f"{fan_in} -> {d}", fan_in * d, d, act=not last)
        fan_in = d
    return out


def forward_flops_per_example(arch: models.Architecture) -> int:
    """FLOPs of one example's forward pass (module docstring: what is counted)."""
    return sum(l.forward for l in layers(arch))


def train_flops_per_example(arch: models.Architecture) -> int:
    """FLOPs of one example's training step: forward + backward as executed (not 3x the
    forward; module docstring)."""
    return sum(l.train for l in layers(arch))


def macs_per_example(arch: models.Architecture) -> int:
    return sum(l.macs for l in layers(arch))


def format_table(arch: models.Architecture) -> str:
    """A markdown table of ``layers(arch)`` with a total row."""
    rows = [f"{arch.name} (width {arch.width:g}, input {_shape(*arch.input_shape)}, "
            f"{arch.num_classes} classes)", "",
            "| layer | shape | multiply-adds | forward FLOPs | backward FLOPs | training FLOPs |",
            "|---|---|---:|---:|---:|---:|"]
    ls = layers(arch)
    for l in ls:
        rows.append(f"| {l.name} | {l.shape} | {l.macs:,} | {l.forward:,} | {l.backward:,} | {l.train:,} |")
    rows.append(f"| total | | {sum(l.macs for l in ls):,} | {sum(l.forward for l in ls):,} | "
                f"{sum(l.backward for l in ls):,} | {sum(l.train for l in ls):,} |")
    return "\n".join(rows)


@contextlib.contextmanager
def _xla_convolutions():
    """Traces the models with XLA's own convolution: a custom-call kernel (``fedmask_jax.conv``
    can route CPU convolutions to oneDNN) would be counted as 0 FLOPs, as cuDNN's are on a GPU."""
    try:
        from fedmask_jax import conv
    except ImportError:  # no switchable convolution: the models call XLA's
        yield
        return
    if not hasattr(conv, "set_cpu_kernel"):
        yield
        return
    before = getattr(conv, "_cpu_kernel", "auto")
    conv.set_cpu_kernel("xla")
    try:
        yield
    finally:
        conv.set_cpu_kernel(before)


def xla_cpu_flops_per_example(arch: models.Architecture, *, train: bool = False,
                              batch_sizes: tuple[int, int] = (2, 4)) -> float:
    """XLA:CPU's ``cost_analysis()`` FLOPs per example, compiled for the CPU device whatever
    the default backend: of the forward pass (thresholded mask), or with ``train`` of the
    gradient of the mean cross-entropy with respect to the scores (straight-through mask).

    Per example = the difference of the counts at two batch sizes divided by theirs, which
    removes the once-per-step mask work. The models are traced with XLA's own convolutions
    (not a custom-call kernel such as ``fedmask_jax.conv``'s oneDNN one), and a compiled
    program that still holds a custom call is an error: cost analysis counts no FLOPs for
    one, which is why on a GPU (cuDNN convolutions) it is no measure at all. A cross-check
    of the analytic count, not a replacement.
    """
    import jax
    import jax.numpy as jnp
    import optax

    cpu = jax.devices("cpu")[0]
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    model = arch.build(masked=True).clone(mask_mode="threshold_ste" if train else "threshold")

    def spec(s):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on_cpu)

    def count(b: int) -> float:
        with _xla_convolutions():
            return _count(b)

    def _count(b: int) -> float:
        x = spec(jax.ShapeDtypeStruct((b, *arch.input_shape), jnp.uint8))
        with jax.default_device(cpu):
            v = jax.eval_shape(model.init, {"params": jax.random.key(0), "frozen": jax.random.key(1)}, x)
        v = jax.tree.map(spec, v)
        if train:
            y = spec(jax.ShapeDtypeStruct((b,), jnp.int32))

            def loss(params, frozen, x, y):
                logits = model.apply({"params": params, "frozen": frozen}, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            lowered = jax.jit(jax.grad(loss)).lower(v["params"], v["frozen"], x, y)
        else:
            lowered = jax.jit(model.apply).lower(v, x)
        compiled = lowered.compile()
        platforms = {d.platform for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set}
        assert platforms == {"cpu"}, platforms
        calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text() or "")))
        if calls:
            raise RuntimeError(f"XLA's cost analysis counts no FLOPs for custom calls; {arch.name}'s "
                               f"compiled program has {calls}")
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))

    b1, b2 = batch_sizes
    return (count(b2) - count(b1)) / (b2 - b1)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedmask_jax.flops", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(STANDARD), help="comma-separated, of " + ",".join(STANDARD))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                   help="print each model's per-layer table")
    p.add_argument("--xla", action="store_true", help="also XLA:CPU's count (compiles each model)")
    args = p.parse_args(argv)
    archs = []
    for name in args.models.split(","):
        shape, classes = STANDARD[name]
        archs.append(models.Architecture(name, classes, shape, width=args.width))
    if args.layers:
        for a in archs:
            print(format_table(a) + "\n")
    head = "| model | input | classes | width | forward FLOPs | training FLOPs | training / forward |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if args.xla:
        head += " XLA:CPU forward | XLA:CPU training |"
        sep += "---:|---:|"
    print(head + "\n" + sep)
    for a in archs:
        fwd, tr = forward_flops_per_example(a), train_flops_per_example(a)
        row = (f"| {a.name} | {_shape(*a.input_shape)} | {a.num_classes} | {a.width:g} | {fwd:,} | "
               f"{tr:,} | {tr / fwd:.3f} |")
        if args.xla:
            xf = xla_cpu_flops_per_example(a)
            xt = xla_cpu_flops_per_example(a, train=True)
            row += f" {xf:,.0f} ({100 * (fwd / xf - 1):+.3f}%) | {xt:,.0f} ({100 * (tr / xt - 1):+.2f}%) |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
