"""The convolution every model calls: XLA's, or on XLA:CPU oneDNN's through JAX's FFI.

XLA:CPU's own convolution kernels are slower than oneDNN's for the paper's CNN layers
(docs/benchmarks.md), so on the CPU backend a float32, stride-1, 'same' NHWC x HWIO
convolution -- every convolution of Conv4/6/10 -- goes to ``kernels.onednn`` when that
extension is built (``python -m fedmask_jax.kernels.build``, run by ``scripts/setup.sh``).
Everything else (other backends, dtypes, strides, dilations, groups) is
``lax.conv_general_dilated``. ``set_cpu_kernel`` chooses ("auto", "onednn", "xla"); the choice
is read when a function is traced, so set it before building the round.

``set_conv_precision`` ("f32", the default, or "bf16") likewise: with "bf16" every
convolution here takes bfloat16 operands -- forward, input gradient and filter gradient --
with float32 accumulation (``_conv_bf16``), on XLA's convolution on every backend (the
oneDNN kernel is float32-only). A masked layer passes its kernel as sign * mask (entries -1,
0, 1: exact in bfloat16) with its scale c applied to the float32 output (``conv2d_same``'s
``w_scale``), so its effective weight is the float32 one exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from fedmask_jax.kernels import onednn

CPU_KERNELS = ("auto", "onednn", "xla")
PRECISIONS = ("f32", "bf16")
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_cpu_kernel = "auto"
_precision = "f32"


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


def set_conv_precision(precision: str) -> str:
    """Chooses the convolutions' operand precision ("f32" or "bf16"); read when a function is
    traced, so set it before building the round."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown convolution precision {precision!r}; expected one of {PRECISIONS}")
    _precision = precision
    return precision


def conv_precision() -> str:
    """The operand precision of a convolution traced now."""
    return _precision


def _bf16_applies(lhs, rhs) -> bool:
    # float32 models only: a float64 one (jax_enable_x64 checks) keeps its precision.
    return _precision == "bf16" and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_bf16(lhs, rhs, conv_kwargs):
    """``lax.conv_general_dilated(lhs, rhs, **conv_kwargs)`` of float32 arrays with bfloat16
    operands and a float32 result (``preferred_element_type``: float32 accumulation).

    Its JVP is written so that the backward products run on bfloat16 operands too: left to
    itself, JAX's transpose of a float32-output convolution casts the bfloat16 operand back
    to float32 and runs the input and filter gradients (two thirds of the FLOPs) in float32.
    Here the tangent convolutions take and give bfloat16 (the gradient of a bfloat16 operand
    is a bfloat16 array whatever the convolution's output type; the kernels accumulate in
    float32), so their transposes do too. They are still JAX's own transposes, so a vmapped
    chunk's summed gradient keeps its batch-grouped filter-gradient convolution.
    """
    kw = dict(conv_kwargs)
    return lax.conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), **kw,
                                    preferred_element_type=jnp.float32)


def _conv_bf16_jvp(conv_kwargs, primals, tangents):
    lhs, rhs = primals
    kw = dict(conv_kwargs)
    lhs16, rhs16 = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
    out = lax.conv_general_dilated(lhs16, rhs16, **kw, preferred_element_type=jnp.float32)
    # Symbolic zeros skipped: the first layer's input has no tangent, and a convolution of
    # zeros would otherwise be computed.
    d_lhs, d_rhs = tangents
    terms = []
    if not isinstance(d_lhs, SymbolicZero):
        terms.append(lax.conv_general_dilated(d_lhs.astype(jnp.bfloat16), rhs16, **kw))
    if not isinstance(d_rhs, SymbolicZero):
        terms.append(lax.conv_general_dilated(lhs16, d_rhs.astype(jnp.bfloat16), **kw))
    if not terms:
        return out, jnp.zeros_like(out)
    d_out = terms[0].astype(jnp.float32)
    for t in terms[1:]:
        d_out = d_out + t.astype(jnp.float32)
    return out, d_out


_conv_bf16.defjvp(_conv_bf16_jvp, symbolic_zeros=True)


def _conv_kwargs(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count, precision) -> tuple:
    """The convolution's parameters as a hashable tuple (``_conv_bf16``'s static argument)."""
    def freeze(v):
        if isinstance(v, lax.ConvDimensionNumbers):
            return lax.ConvDimensionNumbers(*(tuple(d) for d in v))
        return tuple(freeze(u) for u in v) if isinstance(v, (list, tuple)) else v
    return (("window_strides", freeze(window_strides)), ("padding", freeze(padding)),
            ("lhs_dilation", freeze(lhs_dilation)), ("rhs_dilation", freeze(rhs_dilation)),
            ("dimension_numbers", freeze(dimension_numbers)),
            ("feature_group_count", feature_group_count), ("batch_group_count", batch_group_count),
            ("precision", precision))


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
    if _bf16_applies(lhs, rhs) and preferred_element_type in (None, jnp.float32):
        return _conv_bf16(lhs, rhs, _conv_kwargs(window_strides, padding, lhs_dilation, rhs_dilation,
                                                 dimension_numbers, feature_group_count,
                                                 batch_group_count, precision))
    if _onednn_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, batch_group_count, precision, preferred_element_type):
        return onednn.conv2d_same(lhs, rhs, jnp.zeros(rhs.shape[-1:], jnp.float32))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)


def conv2d_same(x: jax.Array, w: jax.Array, b: jax.Array, relu: bool = False,
                w_scale: float | None = None) -> jax.Array:
    """k x k (odd k) stride-1 'same' convolution plus bias, NHWC x HWIO -> NHWC, and its ReLU
    with ``relu`` (on oneDNN the bias gradient comes out of the backward-weights kernel; the
    bias add and the ReLU stay XLA's, fused with their neighbours). ``w_scale`` (a scalar c):
    the kernel is c * w; with bf16 operands c multiplies the float32 output instead, so that
    a kernel of entries +-c or 0 (w = sign * mask) enters exactly."""
    dims = ("NHWC", "HWIO", "NHWC")
    if _bf16_applies(x, w):
        y = _conv_bf16(x, w, _conv_kwargs((1, 1), "SAME", None, None, dims, 1, 1, None))
    else:
        if w_scale is not None:  # float32: the kernel is formed as before, c * w
            w, w_scale = w * jnp.asarray(w_scale, w.dtype), None
        args = (x, w, (1, 1), "SAME", None, None, dims, 1, 1, None, None)
        if _onednn_applies(*args) and b.dtype == jnp.float32:
            return onednn.conv2d_same(x, w, b, relu)
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
    if w_scale is not None:
        y = y * jnp.asarray(w_scale, y.dtype)
    y = y + b
    return jax.nn.relu(y) if relu else y
