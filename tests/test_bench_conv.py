"""The Winograd forms timed by experiments.bench_conv compute the same convolution as XLA, and
every per-client lowering of its --clients mode the same losses and gradients as the host loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench_conv import winograd_conv3x3



@pytest.mark.slow
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


@pytest.mark.slow
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


TINY_LAYER = (6, 3, 4)  # 6x6, 3 -> 4 channels: im2col applies (size <= IM2COL_MAX_SIZE)


def test_client_lowerings_agree_with_the_host_loop():
    """--clients mode: every lowering is checked against the host loop before it is timed."""
    from experiments import bench_conv

    rows = bench_conv.client_rows(clients=3, batch=2, repeats=1, layers=[TINY_LAYER])
    every = {"vmap_grad", "summed_grad", "map_dense", "unrolled", "host_loop", "shared_w_bound"}
    assert [r["kind"] for r in rows] == list(bench_conv.client_lowerings(6))
    assert set(bench_conv.client_lowerings(6)) == every | {"im2col"}
    assert set(bench_conv.client_lowerings(bench_conv.IM2COL_MAX_SIZE + 1)) == every
    size, cin, cout = TINY_LAYER
    flops = 2 * 2 * size * size * 9 * cin * cout * 3  # one product: batch 2, 3 clients
    for r in rows:
        assert r["layer"] == "6x6x3->4" and r["clients"] == 3 and r["forward_ms"] > 0 and r["step_ms"] > 0
        if r["bound"]:
            assert r["max_rel_error_vs_host_loop"] is None
        else:
            assert r["max_rel_error_vs_host_loop"] < 1e-4, r
        assert r["forward_gflops"] == pytest.approx(flops / (r["forward_ms"] / 1e3) / 1e9)
        assert r["step_gflops"] == pytest.approx(3 * flops / (r["step_ms"] / 1e3) / 1e9)


def test_im2col_is_the_convolution():
    from experiments import bench_conv

    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 7, 4))
    w = jax.random.normal(jax.random.key(1), (2, 3, 3, 4, 6))
    expected = jax.vmap(bench_conv._conv)(x, w)
    np.testing.assert_allclose(bench_conv.im2col_conv(x, w), expected, rtol=1e-5, atol=1e-5)


def test_a_wrong_lowering_is_not_timed(monkeypatch):
    """A lowering whose kernel gradients belong to the wrong clients stops the benchmark
    before anything of it is timed."""
    from experiments import bench_conv

    right = bench_conv.client_lowerings(6)["vmap_grad"]

    def swapped(x, w, g):
        losses, (dx, dw) = right["step"](x, w, g)
        return losses, (dx, dw[::-1])

    timed = []
    real_best = bench_conv._best
    monkeypatch.setattr(bench_conv, "_best", lambda fn, repeats: timed.append(fn) or real_best(fn, repeats))
    with pytest.raises(AssertionError, match="swapped disagrees with host_loop"):
        bench_conv.client_rows(clients=2, batch=2, repeats=1, layers=[TINY_LAYER], kinds=["swapped"],
                               extra={"swapped": dict(forward=right["forward"], step=swapped)})
    assert not timed
