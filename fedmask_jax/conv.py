"""The convolution every model calls: XLA's, or on XLA:CPU oneDNN's through JAX's FFI.

XLA:CPU's own convolution kernels are slower than oneDNN's for the paper's CNN layers
(docs/benchmarks.md), so on the CPU backend a float32, stride-1, 'same' NHWC x HWIO
convolution -- every convolution of Conv4/6/10 -- goes to ``kernels.onednn`` when that
extension is built (``python -m fedmask_jax.kernels.build``, run by ``scripts/setup.sh``).
Everything else (other backends, dtypes, strides, dilations, groups) is
``lax.conv_general_dilated``. ``set_cpu_kernel`` chooses ("auto", "onednn", "xla"); the choice
is read when a function is traced, so set it before building the round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedmask_jax.kernels import onednn

CPU_KERNELS = ("auto", "onednn", "xla")
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_cpu_kernel = "auto"


def set_cpu_kernel(kind: str) -> str:
    """Chooses the CPU convolution; returns the one in force ("onednn" or "xla").

    ``"onednn"`` when the extension is not built is an error, ``"auto"`` falls back to XLA.
    """
    global _cpu_kernel
    if kind not in CPU_KERNELS:
        raise ValueError(f"unknown CPU convolution kernel {kind!r}; expected one of {CPU_KERNELS}")
    if kind == "onednn" and not onednn.available():
        raise ValueError("--cpu_conv=onednn but the oneDNN extension is not built: run "
                         "`python -m fedmask_jax.kernels.build` (scripts/setup.sh does), or pass --cpu_conv=xla")
    _cpu_kernel = kind
    return cpu_kernel()


def cpu_kernel() -> str:
    """The kernel a CPU convolution traced now would use."""
    if _cpu_kernel == "xla" or not onednn.available():
        return "xla"
    return "onednn"


def _same_padding(padding, kernel_hw) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "SAME"
    want = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw]
    return [tuple(p) for p in padding] == want


def _onednn_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count, precision, preferred_element_type) -> bool:
    if jax.default_backend() != "cpu" or cpu_kernel() != "onednn":
        return False
    if lhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if preferred_element_type not in (None, jnp.float32) or precision not in (None, lax.Precision.DEFAULT):
        return False
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
        return False
    if tuple(window_strides) != (1, 1) or feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(d not in (None, (1, 1), [1, 1]) for d in (lhs_dilation, rhs_dilation)):
        return False
    return _same_padding(padding, rhs.shape[:2])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated``'s signature (flax's ``nn.Conv`` takes it as is)."""
    if _onednn_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, batch_group_count, precision, preferred_element_type):
        return onednn.conv2d_same(lhs, rhs, jnp.zeros(rhs.shape[-1:], jnp.float32))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)


def conv2d_same(x: jax.Array, w: jax.Array, b: jax.Array, relu: bool = False) -> jax.Array:
    """k x k (odd k) stride-1 'same' convolution plus bias, NHWC x HWIO -> NHWC, and its ReLU
    with ``relu`` (on oneDNN the bias gradient comes out of the backward-weights kernel; the
    bias add and the ReLU stay XLA's, fused with their neighbours)."""
    args = (x, w, (1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"), 1, 1, None, None)
    if _onednn_applies(*args) and b.dtype == jnp.float32:
        return onednn.conv2d_same(x, w, b, relu)
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    return jax.nn.relu(y) if relu else y
