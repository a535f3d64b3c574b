"""The Winograd forms timed by experiments.bench_conv compute the same convolution as XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench_conv import winograd_conv3x3


pytestmark = pytest.mark.slow  # subprocesses, CLIs or many devices

@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matches_xla_conv_and_its_gradient(m):
    shape = (2, 7, 9, 4)  # odd sizes: the tiles overhang and are cropped
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 5)) * 0.2

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(winograd_conv3x3(x, w, m), xla(x, w), rtol=1e-4, atol=1e-4)
    grad = lambda conv: jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w))))(w)  # noqa: E731
    np.testing.assert_allclose(grad(lambda x, w: winograd_conv3x3(x, w, m)), grad(xla),
                               rtol=1e-4, atol=1e-4)


def test_bench_conv_rows_time_all_three_products(tmp_path):
    """A tiny run: every kind times forward, input and filter gradient of every layer."""
    from experiments import bench_conv

    rows = bench_conv.jax_rows(batch=2, repeats=1) + bench_conv.torch_rows(batch=2, repeats=1)
    kinds = {r["kind"] for r in rows}
    assert {"xla", "xla_ynn", "winograd_f2", "winograd_f4"} <= kinds
    assert len(rows) == len(kinds) * len(bench_conv.LAYERS)
    for r in rows:
        parts = r["forward_ms"] + r["input_grad_ms"] + r["filter_grad_ms"]
        assert min(r["forward_ms"], r["input_grad_ms"], r["filter_grad_ms"]) > 0
        assert r["forward_backward_ms"] == pytest.approx(parts)
        if r["kind"] != "torch":
            assert r["max_rel_error_vs_xla"] < 1e-4, r
