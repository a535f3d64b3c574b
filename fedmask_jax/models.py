"""Flax models: masked (frozen weights + trainable scores) and dense twins of each architecture.

Masked layers keep two collections apart:

* ``"frozen"`` -- the random weights and biases, never trained, identical for every client
  (they come from one PRNG seed), so they are broadcast, not copied, to the cohort;
* ``"params"`` -- one real score per frozen entry, the only thing the optimizer sees.

Each forward call in ``"sample"`` mode draws one Bernoulli mask per layer from the ``"mask"``
RNG stream, shared by the whole batch, as the reference does.

Dense twins (``masked=False``) use the same architecture with ordinary trainable weights, for
the baselines that train weights rather than masks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedmask_jax import conv, masking
from fedmask_jax.conv import conv2d_same, conv_general_dilated

WEIGHT_INITS = ("signed_constant", "signed_kaiming")
MODELS = ("mlp", "conv4", "conv6", "conv10")

# (conv widths, a 2x2 max-pool after every second conv): docs/design.md, "The method".
_CONV_WIDTHS = {
    "conv4": (64, 64, 128, 128),
    "conv6": (64, 64, 128, 128, 256, 256),
    "conv10": (64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024),
}
_CONV_DENSE = (256, 256)


def signed_constant_scale(fan_in: int, scheme: str) -> float:
    """The magnitude c of the frozen +-c entries for a layer with this fan-in."""
    if scheme == "signed_constant":  # the authors' code: e * sqrt(1 / fan_in)
        return math.e * math.sqrt(1.0 / fan_in)
    if scheme == "signed_kaiming":  # the supermask literature: sqrt(2 / fan_in)
        return math.sqrt(2.0 / fan_in)
    raise ValueError(f"unknown weight_init {scheme!r}; expected one of {WEIGHT_INITS}")


def _signed_constant(key: jax.Array, shape: Sequence[int], scale: float) -> jax.Array:
    signs = jax.random.bernoulli(key, 0.5, shape)
    return jnp.where(signs, scale, -scale).astype(jnp.float32)


class _MaskedLayer(nn.Module):
    """Shared machinery: frozen +-c weight and bias, N(0,1) scores, one mask per call."""

    weight_init: str = "signed_constant"
    mask_mode: str = "sample"
    mask_gradient: str = "reference"

    def _masked(self, name: str, shape: Sequence[int], fan_in: int) -> jax.Array:
        frozen, mask, _ = self._frozen_and_mask(name, shape, fan_in)
        return frozen * mask

    def _frozen_and_mask(self, name: str, shape: Sequence[int], fan_in: int):
        """(frozen +-c entries, this call's mask, c) of one masked array."""
        scale = signed_constant_scale(fan_in, self.weight_init)
        frozen = self.variable(
            "frozen", name, lambda: _signed_constant(self.make_rng("frozen"), shape, scale)
        ).value
        scores = self.param(name, nn.initializers.normal(1.0), tuple(shape), jnp.float32)
        if self.mask_mode == "sample":
            mask = masking.sample_mask(scores, self.make_rng("mask"), self.mask_gradient)
        elif self.mask_mode == "threshold":
            mask = masking.threshold_mask(scores)
        elif self.mask_mode == "threshold_ste":
            mask = masking.threshold_mask_ste(scores)
        elif self.mask_mode == "expected":
            mask = jax.nn.sigmoid(scores)
        else:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; expected {masking.MASK_MODES}")
        # Recorded only when the caller makes "intermediates" mutable (parity checks, export).
        self.sow("intermediates", f"{name}_mask", mask)
        return frozen, mask, scale


def signed_mask(frozen: jax.Array, mask: jax.Array) -> jax.Array:
    """sign(w) * m for frozen +-c weights: the masked weight w * m is c * signed_mask, and its
    entries (-1, 0, 1 for a binary mask) are exact in bfloat16."""
    return jnp.where(frozen < 0, -mask, mask)


class MaskedDense(_MaskedLayer):
    features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self._masked("kernel", (fan_in, self.features), fan_in)
        bias = self._masked("bias", (self.features,), fan_in)
        return x @ kernel + bias


class MaskedConv(_MaskedLayer):
    """3x3 'same' convolution plus bias, NHWC. It returns the pre-activation, so that a
    captured intermediate is the convolution's output (the ReLU is the network's)."""

    features: int = 0
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        fan_in = k * k * c_in
        if conv.conv_precision() == "bf16":
            # c * (sign * mask): the bfloat16 operand is exact for a binary mask, c is applied
            # to the float32 output (both weight inits are +-c, so w * m == c * sign * m).
            frozen, mask, scale = self._frozen_and_mask("kernel", (k, k, c_in, self.features), fan_in)
            bias = self._masked("bias", (self.features,), fan_in)
            return conv2d_same(x, signed_mask(frozen, mask), bias, w_scale=np.float32(scale))
        kernel = self._masked("kernel", (k, k, c_in, self.features), fan_in)
        bias = self._masked("bias", (self.features,), fan_in)
        return conv2d_same(x, kernel, bias)


def _pool_windows(x: jax.Array) -> jax.Array:
    """[b, h, w, c] -> [b, h/2, 2, w/2, 2, c] (odd last rows/columns dropped, as floor pooling)."""
    b, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/stride-2 max-pool (floor for odd sizes) as reshape + max.

    The gradient goes to the *first* maximum of each window in row-major order, as in
    PyTorch's ``max_pool2d`` (the authors' code) and XLA's select-and-scatter; the gradient
    JAX derives for ``max`` would split it evenly among tied maxima, and ties are common
    here (uint8 pixels, +-c weights, binary masks). Written as a reshape with an equality
    mask rather than ``nn.max_pool``, whose select-and-scatter gradient costs 8x more on
    XLA:CPU (docs/benchmarks.md).
    """
    return _pool_windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    win = _pool_windows(x)
    hit = win == y[:, :, None, :, None, :]  # [b, h/2, dy, w/2, dx, c]
    # The first maximum in row-major (dy, dx) order: a hit with no hit before it.
    h00, h01, h10, h11 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0], hit[:, :, 1, :, 1]
    first = jnp.stack([
        jnp.stack([h00, h01 & ~h00], axis=3),
        jnp.stack([h10 & ~(h00 | h01), h11 & ~(h00 | h01 | h10)], axis=3)], axis=2)
    dwin = jnp.where(first, g[:, :, None, :, None, :], 0.0).astype(g.dtype)
    b, h, w, c = x.shape
    dx = dwin.reshape(b, h - h % 2, w - w % 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def normalize_images(x: jax.Array) -> jax.Array:
    """uint8 pixels -> [0, 1] -> mean 0.5, std 0.5, as the reference's transforms."""
    return (x.astype(jnp.result_type(x, jnp.float32)) / 255.0 - 0.5) / 0.5  # float64 stays float64


def _scaled(width: int, multiplier: float) -> int:
    return max(1, int(round(width * multiplier)))


class MLP(nn.Module):
    """Fully connected net, e.g. 784-300-100-10."""

    num_classes: int
    hidden: Sequence[int] = (300, 100)
    width: float = 1.0
    masked: bool = True
    weight_init: str = "signed_constant"
    mask_mode: str = "sample"
    mask_gradient: str = "reference"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = normalize_images(x).reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(self._dense(_scaled(h, self.width))(x))
        return self._dense(self.num_classes)(x)

    def _dense(self, features: int) -> nn.Module:
        if self.masked:
            return MaskedDense(
                features=features,
                weight_init=self.weight_init,
                mask_mode=self.mask_mode,
                mask_gradient=self.mask_gradient,
            )
        return nn.Dense(features)


class ConvNet(nn.Module):
    """Conv4/6/10: 3x3 convs + ReLU, 2x2 max-pool after every second conv, FC 256-256-out."""

    num_classes: int
    conv_widths: Sequence[int] = _CONV_WIDTHS["conv4"]
    dense_widths: Sequence[int] = _CONV_DENSE
    width: float = 1.0
    masked: bool = True
    weight_init: str = "signed_constant"
    mask_mode: str = "sample"
    mask_gradient: str = "reference"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = normalize_images(x)
        for i, w in enumerate(self.conv_widths):
            x = nn.relu(self._layer(MaskedConv, nn.Conv, _scaled(w, self.width), conv=True)(x))
            if i % 2 == 1:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        for w in self.dense_widths:
            x = nn.relu(self._layer(MaskedDense, nn.Dense, _scaled(w, self.width))(x))
        return self._layer(MaskedDense, nn.Dense, self.num_classes)(x)

    def _layer(self, masked_cls, dense_cls, features: int, conv: bool = False) -> nn.Module:
        if self.masked:
            return masked_cls(
                features=features,
                weight_init=self.weight_init,
                mask_mode=self.mask_mode,
                mask_gradient=self.mask_gradient,
            )
        if conv:
            return dense_cls(features, (3, 3), padding="SAME", conv_general_dilated=conv_general_dilated)
        return dense_cls(features)


def build_model(
    name: str,
    num_classes: int,
    *,
    width: float = 1.0,
    mlp_hidden: Sequence[int] = (300, 100),
    masked: bool = True,
    weight_init: str = "signed_constant",
    mask_gradient: str = "reference",
) -> nn.Module:
    """Builds an architecture by name ("mlp", "conv4", "conv6", "conv10")."""
    common = dict(
        num_classes=num_classes, width=width, masked=masked, weight_init=weight_init,
        mask_gradient=mask_gradient,
    )
    if name == "mlp":
        return MLP(hidden=tuple(mlp_hidden), **common)
    if name in _CONV_WIDTHS:
        return ConvNet(conv_widths=_CONV_WIDTHS[name], **common)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def is_conv(name: str) -> bool:
    return name in _CONV_WIDTHS


def count_entries(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def init_model_variables(model: nn.Module, sample_x: jax.Array, key: jax.Array) -> dict:
    """Scores and frozen weights from one key -- how a saved model rebuilds its weights.

    One compiled program: run eagerly, flax's init compiles each layer's draws and its
    forward pass op by op (about 50 small programs for a one-layer MLP, most of a small run's
    compile time); the values are the same bit for bit (tests/test_models.py)."""
    def init(key, sample_x):
        k_scores, k_frozen, k_mask = jax.random.split(key, 3)
        return model.init({"params": k_scores, "frozen": k_frozen, "mask": k_mask}, sample_x)
    return jax.jit(init)(key, sample_x)


def init_dense_variables(model: nn.Module, sample_x: jax.Array, key: jax.Array) -> dict:
    """An unmasked model's variables, as one compiled program (see ``init_model_variables``)."""
    return jax.jit(model.init)(key, sample_x)


def unflat_like(vector: jax.Array, like: Any) -> Any:
    """A flat vector back into a tree shaped (and typed) like ``like``, leaves in
    ``jax.tree.leaves`` order."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(vector[start:start + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
        start += leaf.size
    return jax.tree.unflatten(treedef, out)


def flat(tree: Any) -> np.ndarray:
    """All leaves of a parameter tree as one flat host array, in the uplink payload's order."""
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def unflat(vector: np.ndarray, like: Any) -> Any:
    """Inverse of ``flat`` for a tree shaped like ``like``."""
    return unflat_like(jnp.asarray(vector), like)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An architecture for a dataset: enough to build its masked or dense model anywhere
    (a saved model file stores it)."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    width: float = 1.0
    mlp_hidden: tuple[int, ...] = (300, 100)

    def build(self, *, masked: bool, weight_init: str = "signed_constant",
              mask_gradient: str = "reference") -> nn.Module:
        return build_model(self.name, self.num_classes, width=self.width,
                           mlp_hidden=self.mlp_hidden, masked=masked, weight_init=weight_init,
                           mask_gradient=mask_gradient)

    def sample_input(self) -> jax.Array:
        """One all-zero input batch of the dataset's shape (uint8 pixels), for shapes."""
        return jnp.zeros((1, *self.input_shape), jnp.uint8)

    @property
    def conv(self) -> bool:
        return is_conv(self.name)
