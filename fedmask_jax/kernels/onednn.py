"""oneDNN's convolutions as XLA:CPU custom calls (JAX FFI), with their own VJP.

``conv2d_same(x, w, b, relu)`` is a stride-1, 'same'-padded 2-D convolution of NHWC
activations with an HWIO kernel plus a bias, optionally followed by a ReLU, the convolution
computed by oneDNN (``onednn_conv.cc``); its gradient calls oneDNN's backward-data and
backward-weights kernels (the latter also gives the bias gradient, saving XLA a reduction
over the whole output gradient), two separate custom calls so that XLA drops the one nobody
uses (the first layer's input gradient). ``available()`` says whether the
extension was built and loads; ``fedmask_jax.conv`` decides when to use it.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp

from fedmask_jax.kernels.build import TARGET

_TARGETS = {"forward": "FedmaskConvForward", "backward_data": "FedmaskConvBackwardData",
            "backward_weights": "FedmaskConvBackwardWeights"}
_PREFIX = "fedmask_onednn_conv_"


@functools.cache
def _load() -> str | None:
    """Loads and registers the extension once; returns oneDNN's version, or None."""
    if not TARGET.exists():
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(TARGET))
    except OSError:
        return None
    for kind, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(_PREFIX + kind, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.FedmaskOnednnVersion.restype = ctypes.c_char_p
    return lib.FedmaskOnednnVersion().decode()


def available() -> bool:
    return _load() is not None


def version() -> str | None:
    """oneDNN's version, e.g. ``"3.2.0"``, when the extension is built and loads."""
    return _load()


def _call(kind: str, out_shapes, *args, **attrs):
    if _load() is None:
        raise RuntimeError("the oneDNN convolution extension is not built: run "
                           "`python -m fedmask_jax.kernels.build` (scripts/setup.sh does)")
    # vmap (a chunk of clients vmapped on CPU) runs the kernel once per client.
    return jax.ffi.ffi_call(_PREFIX + kind, out_shapes, vmap_method="sequential")(*args, **attrs)


def _f32(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d_same(x: jax.Array, w: jax.Array, b: jax.Array, relu: bool = False) -> jax.Array:
    """[N, H, W, C] x [KH, KW, C, O] + b [O] -> [N, H, W, O], float32, on XLA:CPU; with
    ``relu`` the ReLU of that. The convolution is oneDNN's; bias and ReLU are XLA's, one fusion
    after it, rounded exactly as ``lax.conv_general_dilated(...) + b`` would be."""
    return _epilogue(_call("forward", _f32((*x.shape[:3], w.shape[3])), x, w), b, relu)


def _epilogue(z, b, relu):
    y = z + b
    return jnp.maximum(y, 0.0) if relu else y


def _fwd(x, w, b, relu):
    y = conv2d_same(x, w, b, relu)
    return y, (x, w, y if relu else None)


def _bwd(relu, residuals, dy):
    x, w, y = residuals
    dy = dy.astype(jnp.float32)
    if relu:  # ReLU's gradient as JAX's: zero where the output is not positive
        dy = jnp.where(y > 0, dy, 0.0)
    dx = _call("backward_data", _f32(x.shape), x, w, dy)
    dw, db = _call("backward_weights", (_f32(w.shape), _f32(w.shape[-1:])), x, w, dy)
    return dx, dw, db


conv2d_same.defvjp(_fwd, _bwd)
