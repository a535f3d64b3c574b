"""--conv_precision: f32 (the default) computes what it computed before; bf16 gives bfloat16
convolution operands with float32 accumulation, a masked kernel exact as c * (sign * mask),
and a FedPM Conv4 round close to the float32 one."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import conv, models
from fedmask_jax.run_config import RunConfig
from tests.helpers import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNGS = {"params": jax.random.key(0), "frozen": jax.random.key(2), "mask": jax.random.key(3)}
ARCH = models.Architecture("conv4", 10, (8, 8, 1), width=0.25)  # digits-sized: 8x8 images


@pytest.fixture(autouse=True)
def restore():
    """Each test leaves the process's convolution settings as it found them."""
    before = conv._precision, conv._cpu_kernel
    yield
    conv._precision, conv._cpu_kernel = before


def _images(n=6, hw=8, seed=1):
    return jax.random.randint(jax.random.key(seed), (n, hw, hw, 1), 0, 256).astype(jnp.uint8)


def _logits(model, v, x, precision):
    conv.set_conv_precision(precision)
    return jax.jit(lambda v, x: model.apply(v, x, rngs={"mask": jax.random.key(4)}))(v, x)


def test_default_is_f32_and_computes_the_float32_formula_bit_for_bit():
    assert RunConfig().conv_precision == "f32" and conv.conv_precision() == "f32"
    conv.set_cpu_kernel("xla")  # so that the formula below is the same kernel
    layer = models.MaskedConv(features=5)
    x = jax.random.normal(jax.random.key(0), (3, 7, 7, 4))
    v = jax.jit(layer.init)(RNGS, x)
    y, state = jax.jit(lambda v, x: layer.apply(v, x, rngs={"mask": jax.random.key(4)},
                                                mutable=["intermediates"]))(v, x)
    sown = state["intermediates"]
    kernel = v["frozen"]["kernel"] * sown["kernel_mask"][0]
    bias = v["frozen"]["bias"] * sown["bias_mask"][0]
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    # No bfloat16 anywhere in a float32 Conv4 step, even after a bf16 program was traced.
    model = ARCH.build(masked=True)
    xs = _images()
    params = model.init(RNGS, xs[:1])
    conv.set_conv_precision("bf16")
    jax.jit(lambda v: model.apply(v, xs, rngs={"mask": jax.random.key(4)})).lower(params)  # traced only
    conv.set_conv_precision("f32")
    step = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**params, "params": p}, xs, rngs={"mask": jax.random.key(4)}))))
    assert "bf16" not in step.lower(params["params"]).as_text()


@pytest.mark.parametrize("weight_init", models.WEIGHT_INITS)
def test_masked_kernel_is_exact_in_bf16(weight_init):
    model = ARCH.build(masked=True, weight_init=weight_init)
    v = model.init(RNGS, _images(1))
    for name in ("MaskedConv_0", "MaskedConv_1", "MaskedConv_3"):
        frozen = v["frozen"][name]["kernel"]
        fan_in = int(np.prod(frozen.shape[:3]))
        c = np.float32(models.signed_constant_scale(fan_in, weight_init))
        assert jnp.asarray(c, jnp.bfloat16).astype(jnp.float32) != c  # c itself is not a bf16 number
        mask = jax.random.bernoulli(jax.random.key(5), 0.5, frozen.shape).astype(jnp.float32)
        unit = models.signed_mask(frozen, mask).astype(jnp.bfloat16)
        assert set(np.unique(np.asarray(unit, np.float32))) <= {-1.0, 0.0, 1.0}
        f32 = np.asarray(frozen * mask)
        exact = np.asarray(c * unit.astype(jnp.float32))
        np.testing.assert_array_equal(exact.view(np.uint32), f32.view(np.uint32))  # -0.0 included


def test_bf16_masked_conv_rounds_only_its_input():
    """With the input already a bfloat16 number, a bf16 MaskedConv is the float32 one up to
    the order of the sums: its kernel enters exactly (rounding c to bf16 would be 2^-9)."""
    conv.set_cpu_kernel("xla")
    layer = models.MaskedConv(features=6)
    x = jax.random.normal(jax.random.key(0), (3, 7, 7, 4)).astype(jnp.bfloat16).astype(jnp.float32)
    v = jax.jit(layer.init)(RNGS, x)
    apply = lambda v, x: layer.apply(v, x, rngs={"mask": jax.random.key(4)})  # noqa: E731
    ref = jax.jit(apply)(v, x)
    conv.set_conv_precision("bf16")
    got = jax.jit(apply)(v, x)
    assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 1e-5


@pytest.mark.parametrize("masked", [True, False])
def test_bf16_forward_matches_f32_within_bf16_tolerance(masked):
    model = ARCH.build(masked=masked)  # masked=False: flax's nn.Conv through conv_general_dilated
    x = _images()
    v = model.init(RNGS, x[:1])
    ref, got = _logits(model, v, x, "f32"), _logits(model, v, x, "bf16")
    assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 2e-2
    conv.set_conv_precision("bf16")
    text = jax.jit(lambda v: model.apply(v, x, rngs={"mask": jax.random.key(4)})).lower(v).as_text()
    assert "xbf16>) -> tensor<" in text and "fedmask_onednn" not in text  # XLA's, bf16 operands


def test_bf16_gradients_run_on_bf16_operands_and_match():
    """Forward, input gradient and filter gradient all take bfloat16 operands (JAX's own
    transpose would run the two gradients in float32); the gradients agree to bf16 accuracy."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    g = jax.random.normal(jax.random.key(2), (2, 6, 6, 5))
    b = jnp.zeros(5)
    loss = lambda x, w: jnp.sum(g * conv.conv2d_same(x, w, b))  # noqa: E731  linear: no ReLU flips
    conv.set_cpu_kernel("xla")
    ref = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)[1]
    conv.set_conv_precision("bf16")
    grad = jax.jit(jax.value_and_grad(loss, (0, 1)))
    convs = [l for l in grad.lower(x, w).as_text().splitlines() if "stablehlo.convolution" in l]
    assert len(convs) == 3 and all(l.count("bf16>") >= 2 for l in convs), convs
    for a, r in zip(grad(x, w)[1], ref):
        assert a.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))) < 1e-2


def test_an_unknown_precision_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--conv_precision='fp16' is unknown; allowed: f32, bf16"):
        RunConfig(conv_precision="fp16")
    with pytest.raises(ValueError, match="unknown convolution precision"):
        conv.set_conv_precision("fp16")


@pytest.mark.slow  # a CLI
def test_the_cli_refuses_an_unknown_precision_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--conv_precision=fp16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert len(errors) == 1 and "--conv_precision=fp16" in errors[0], proc.stderr


@pytest.mark.slow  # conv rounds
def test_fedpm_conv4_round_in_bf16_is_close_to_f32():
    from fedmask_jax import experiment

    results = {}
    for p in ("f32", "bf16"):
        # test_conv_kernels' setting: its f32 round is the same program, compiled once for both
        cfg = RunConfig(dataset="digits", model="conv4", width=0.25, num_clients=4, clients_per_round=2,
                        local_epochs=1, batch_size=32, max_examples_per_client=64, conv_precision=p,
                        verbose=False, method={"coded_uplink": False})
        exp = experiment.build(cfg, dataset=digits())
        server, store = exp.initial_state()
        out = exp.round_fn(server, store, exp.data, exp.cohort(0), exp.round_key(0))
        evaluated = exp.eval_fn(out.server, exp.x_test, exp.y_test, jax.random.key(9))
        theta = jnp.concatenate([jax.nn.sigmoid(s).ravel() for s in jax.tree.leaves(out.server.scores)])
        results[p] = ({k: float(v) for k, v in {**out.metrics, **evaluated}.items()}, theta)
    (m32, t32), (m16, t16) = results["f32"], results["bf16"]
    assert m32.keys() == m16.keys()
    for k in m32:  # accuracies after one round sit near chance (297 test images): 0.05 is 15 of them
        tol = dict(abs=0.05) if "accuracy" in k else dict(rel=0.05, abs=1e-6)
        assert m16[k] == pytest.approx(m32[k], **tol), (k, m16[k], m32[k])
    # The same uniforms draw the uploaded masks: nearly every server probability is the same.
    assert float(jnp.mean(jnp.abs(t16 - t32) < 1e-6)) > 0.95


def test_the_benchmark_records_each_convolution_s_element_types():
    from experiments.benchmark_report import conv_op_types, f32_twin

    assert f32_twin("conv4_w1_k100_bf16") == "conv4_w1_k100" and f32_twin("conv4_w1_k100") is None
    conv.set_cpu_kernel("xla")
    x, w, b = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4)), jnp.zeros(4)
    ops = {}
    for p in ("f32", "bf16"):
        conv.set_conv_precision(p)
        step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv.conv2d_same(x, w, b))), (0, 1)))
        ops[p] = conv_op_types(step.lower(x, w).compile().as_text())
    assert ops["f32"] == {"convolution f32,f32->f32": 3}
    # XLA:CPU runs bfloat16 convolutions in float32 (it converts the operands): recorded as such.
    assert sum(ops["bf16"].values()) == 3 and all(k.startswith("convolution ") for k in ops["bf16"])
