"""Bernoulli masks over frozen weights, and the gradients that flow through them.

A masked entry keeps its frozen weight with probability theta = sigmoid(score). The forward
pass draws one hard mask m ~ Bernoulli(theta); the backward pass needs a surrogate gradient
because sampling is not differentiable. Two surrogates are offered:

* ``"reference"`` (default) -- the authors' custom autograd backward returns theta * g, so
  dL/dscore = (dL/dm) * theta * theta * (1 - theta).
* ``"straight_through"`` -- m = theta + stop_gradient(m - theta), giving dL/dtheta = dL/dm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRADIENTS = ("reference", "straight_through")
MASK_MODES = ("sample", "threshold", "threshold_ste", "expected")


@jax.custom_vjp
def _bernoulli_reference(theta: jax.Array, uniform: jax.Array) -> jax.Array:
    return (uniform < theta).astype(theta.dtype)


def _bernoulli_reference_fwd(theta, uniform):
    return _bernoulli_reference(theta, uniform), theta


def _bernoulli_reference_bwd(theta, g):
    # The reference backward scales the incoming gradient by theta (not the identity).
    return theta * g, None


_bernoulli_reference.defvjp(_bernoulli_reference_fwd, _bernoulli_reference_bwd)


def sample_mask(scores: jax.Array, key: jax.Array, gradient: str = "reference") -> jax.Array:
    """Draws m ~ Bernoulli(sigmoid(scores)) with the chosen surrogate gradient to ``scores``."""
    theta = jax.nn.sigmoid(scores)
    uniform = jax.random.uniform(key, scores.shape, scores.dtype)
    if gradient == "reference":
        return _bernoulli_reference(theta, uniform)
    if gradient == "straight_through":
        hard = (uniform < theta).astype(theta.dtype)
        return theta + jax.lax.stop_gradient(hard - theta)
    raise ValueError(f"unknown mask gradient {gradient!r}; expected one of {GRADIENTS}")


def threshold_mask(scores: jax.Array) -> jax.Array:
    """The deterministic mask 1[sigmoid(s) > 0.5] (equivalently s > 0)."""
    return (scores > 0).astype(scores.dtype)


def threshold_mask_ste(scores: jax.Array) -> jax.Array:
    """1[sigmoid(s) > 0.5] forward; straight-through backward to sigmoid(s), as FedMask
    (Li et al. 2021) trains its deterministic masks: dL/ds = dL/dm * sigmoid'(s)."""
    theta = jax.nn.sigmoid(scores)
    return theta + jax.lax.stop_gradient(threshold_mask(scores) - theta)


def keep_probabilities(scores):
    """theta = sigmoid(score) for every leaf of a tree of scores."""
    return jax.tree.map(jax.nn.sigmoid, scores)


def smooth_mask(mask: jax.Array, epsilon: float) -> jax.Array:
    """Maps a binary mask 0 -> eps, 1 -> 1 - eps, as the reference does before aggregation."""
    return mask * (1.0 - 2.0 * epsilon) + epsilon


def binary_entropy(p: jax.Array) -> jax.Array:
    """H_b(p) in bits, with H_b(0) = H_b(1) = 0."""
    p = jnp.clip(p, 0.0, 1.0)
    safe = jnp.clip(p, 1e-12, 1 - 1e-12)
    h = -(safe * jnp.log2(safe) + (1 - safe) * jnp.log2(1 - safe))
    return jnp.where((p <= 0) | (p >= 1), 0.0, h)


def mask_bits(num_ones: jax.Array, num_entries: int) -> jax.Array:
    """The reference's ideal cost of sending a binary mask: n * H_b(f) + log2(n) bits."""
    f = num_ones / num_entries
    return num_entries * binary_entropy(f) + jnp.log2(float(num_entries))
