import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import masking
from fedmask_jax.models import MaskedDense


def _layer_grads(gradient: str):
    layer = MaskedDense(features=3, mask_gradient=gradient)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    c = jax.random.normal(jax.random.key(1), (5, 3))
    variables = layer.init({"params": jax.random.key(2), "frozen": jax.random.key(3),
                            "mask": jax.random.key(4)}, x)
    mask_key = jax.random.key(5)

    def loss(scores):
        y = layer.apply({"params": scores, "frozen": variables["frozen"]}, x,
                        rngs={"mask": mask_key})
        return jnp.sum(y * c)

    grads = jax.grad(loss)(variables["params"])
    # The loss is linear in the effective weights: dL/dW_eff = x^T c, dL/db_eff = sum_b c.
    d_w_eff, d_b_eff = x.T @ c, c.sum(0)
    return variables, grads, d_w_eff, d_b_eff


def test_reference_gradient_matches_closed_form():
    variables, grads, d_w, d_b = _layer_grads("reference")
    for name, d_eff in (("kernel", d_w), ("bias", d_b)):
        s = variables["params"][name]
        theta = jax.nn.sigmoid(s)
        expected = d_eff * variables["frozen"][name] * theta**2 * (1 - theta)
        np.testing.assert_allclose(grads[name], expected, rtol=1e-5, atol=1e-6)


def test_straight_through_gradient_is_identity_through_sample():
    variables, grads, d_w, d_b = _layer_grads("straight_through")
    for name, d_eff in (("kernel", d_w), ("bias", d_b)):
        theta = jax.nn.sigmoid(variables["params"][name])
        expected = d_eff * variables["frozen"][name] * theta * (1 - theta)
        np.testing.assert_allclose(grads[name], expected, rtol=1e-5, atol=1e-6)


def test_sample_mask_is_binary_with_mean_theta():
    scores = jnp.full((200_000,), 0.7)
    m = masking.sample_mask(scores, jax.random.key(0))
    assert set(np.unique(np.asarray(m)).tolist()) <= {0.0, 1.0}
    assert abs(float(m.mean()) - float(jax.nn.sigmoid(0.7))) < 0.005


def test_unknown_gradient_rejected():
    with pytest.raises(ValueError, match="mask gradient"):
        masking.sample_mask(jnp.zeros(3), jax.random.key(0), "nope")


def test_mask_bits_reference_formula():
    n = 1000
    bits = float(masking.mask_bits(jnp.float32(250), n))
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert bits == pytest.approx(n * h + math.log2(n), rel=1e-5)
    assert float(masking.mask_bits(jnp.float32(0), n)) == pytest.approx(math.log2(n), rel=1e-6)


def test_smooth_mask():
    np.testing.assert_allclose(masking.smooth_mask(jnp.array([0.0, 1.0]), 0.01), [0.01, 0.99])
