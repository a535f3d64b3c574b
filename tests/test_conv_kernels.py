"""oneDNN's convolution behind JAX's FFI (fedmask_jax.kernels) against XLA's: the same values
and gradients, in a model and in a whole FedPM round; its build and its fallback."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import conv, models
from fedmask_jax.kernels import build, onednn
from tests.helpers import digits

X86_LINUX = sys.platform.startswith("linux") and os.uname().machine == "x86_64"


@pytest.fixture
def kernel():
    """Restores the process's CPU convolution choice after a test changes it."""
    before = conv._cpu_kernel
    yield conv.set_cpu_kernel
    conv._cpu_kernel = before


def test_extension_is_built_where_it_can_be():
    # scripts/setup.sh builds it; on x86-64 Linux a missing build is a broken install.
    if not X86_LINUX:
        pytest.skip("the extension is built for x86-64 Linux only")
    assert onednn.available(), "run `python -m fedmask_jax.kernels.build`"
    assert onednn.version().startswith("3.")


needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN extension not built")


def _xla(x, w, b, relu):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    return jax.nn.relu(y) if relu else y


@needs_onednn
@pytest.mark.parametrize("n,hw,c,o,k,relu", [(5, 9, 3, 4, 3, True), (4, 8, 1, 6, 3, False),
                                             (3, 7, 4, 5, 5, True), (1, 6, 2, 3, 3, True)])
def test_values_and_gradients_match_xla(n, hw, c, o, k, relu):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (n, hw, hw, c))
    w = jax.random.normal(keys[1], (k, k, c, o))
    b = jax.random.normal(keys[2], (o,))
    dy = jax.random.normal(keys[3], (n, hw, hw, o))
    ours, vjp_ours = jax.vjp(lambda *a: onednn.conv2d_same(*a, relu), x, w, b)
    ref, vjp_ref = jax.vjp(lambda *a: _xla(*a, relu), x, w, b)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp_ours(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_under_vmap_each_client_gets_its_own_kernel():
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (3, 2, 6, 6, 2))  # 3 clients
    w = jax.random.normal(keys[1], (3, 3, 3, 2, 4))
    b = jnp.zeros((4,))
    f = lambda x, w: jnp.sum(onednn.conv2d_same(x, w, b, True) ** 2)  # noqa: E731
    g = lambda x, w: jnp.sum(_xla(x, w, b, True) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.vmap(jax.grad(f, 1))(x, w), jax.vmap(jax.grad(g, 1))(x, w), rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("masked", [True, False])
def test_conv4_loss_and_gradients_match_xla(kernel, masked):
    arch = models.Architecture("conv4", 10, (28, 28, 1), width=0.25)
    model = arch.build(masked=masked)
    x = jax.random.randint(jax.random.key(1), (6, 28, 28, 1), 0, 255).astype(jnp.uint8)
    y = jnp.arange(6) % 10
    v = model.init({"params": jax.random.key(0), "frozen": jax.random.key(2), "mask": jax.random.key(3)}, x[:1])
    rest = {k: v[k] for k in v if k != "params"}

    def loss(params):
        out = model.apply({"params": params, **rest}, x, rngs={"mask": jax.random.key(4)})
        return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(6), y])

    results = {}
    for k in ("xla", "onednn"):
        kernel(k)
        lowered = jax.jit(jax.value_and_grad(loss)).lower(v["params"])
        assert ("fedmask_onednn_conv" in lowered.as_text()) == (k == "onednn")
        results[k] = lowered.compile()(v["params"])
    (l1, g1), (l2, g2) = results["xla"], results["onednn"]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_choosing_onednn_where_it_is_not_built_is_an_error(kernel, monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    with pytest.raises(ValueError, match="kernels.build"):
        kernel("onednn")
    assert kernel("auto") == "xla"  # auto falls back
    with pytest.raises(ValueError, match="unknown CPU convolution"):
        kernel("mkl")


def test_build_without_onednn_says_why_and_succeeds(monkeypatch, capsys):
    def missing(dist):
        raise build.importlib.metadata.PackageNotFoundError(dist)
    monkeypatch.setattr(build.importlib.metadata, "files", missing)
    assert build.main(["--quiet", "--force"]) == 0
    out = capsys.readouterr().out
    assert "not built" in out and "onednn" in out and "XLA's convolution" in out


@needs_onednn
@pytest.mark.slow
def test_fedpm_conv4_round_matches_xla(kernel):
    from fedmask_jax import experiment
    from fedmask_jax.run_config import RunConfig

    metrics = {}
    for k in ("xla", "onednn"):
        cfg = RunConfig(dataset="digits", model="conv4", width=0.25, num_clients=4, clients_per_round=2,
                        local_epochs=1, batch_size=32, max_examples_per_client=64, cpu_conv=k,
                        verbose=False, method={"coded_uplink": False})
        exp = experiment.build(cfg, dataset=digits())
        server, store = exp.initial_state()
        out = exp.round_fn(server, store, exp.data, exp.cohort(0), exp.round_key(0))
        metrics[k] = {m: float(v) for m, v in out.metrics.items()}
        metrics[k]["theta_sum"] = float(sum(jnp.sum(jax.nn.sigmoid(s)) for s in jax.tree.leaves(out.server.scores)))
    assert metrics["xla"].keys() == metrics["onednn"].keys()
    for m in metrics["xla"]:
        np.testing.assert_allclose(metrics["onednn"][m], metrics["xla"][m], rtol=1e-3, err_msg=m)
