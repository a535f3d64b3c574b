"""The final model as one file: frozen-weight seed + architecture + one range-coded mask.

Layout (little-endian):

    8 bytes   magic b"FMJXMASK"
    2 bytes   format version (1)
    4 bytes   header length H
    H bytes   header, UTF-8 JSON: architecture, seed, mask kind, entry count, ones, words
    4*W bytes the mask, range-coded with its own frequency (fedmask_jax.coding, global code)
    4 bytes   CRC-32 of everything above

Loading checks every length, the magic, the version, the CRC, every header field's type and
bounds, the mask length against the architecture's (from shapes, before anything is built)
and the decoded count of ones, so a truncated, altered or forged file raises
``ModelFileError`` -- quickly and without allocating what it claims -- instead of producing a
wrong model.
The frozen weights are not stored: they are regenerated from the seed exactly as the run
made them (``models.init_model_variables`` with ``keys.server_key(seed)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmask_jax import coding, keys, masking, models

MAGIC = b"FMJXMASK"
VERSION = 1
MASK_KINDS = ("sampled", "thresholded")


class ModelFileError(ValueError):
    """A model file is truncated, corrupted, or not a fedmask_jax model file."""


def export_model(path: str, *, architecture: dict, input_shape, seed: int,
                 mask_flat: np.ndarray, mask_kind: str) -> int:
    """Writes the model file atomically; returns its size in bytes."""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    mask_flat = np.asarray(mask_flat, np.uint8).ravel()
    ones, words = coding.encode_global(mask_flat)
    header = json.dumps({
        "architecture": architecture, "input_shape": list(input_shape), "seed": int(seed),
        "mask_kind": mask_kind, "num_params": int(mask_flat.size), "ones": ones,
        "num_words": int(len(words)),
    }, sort_keys=True).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(header)) + header + \
        np.asarray(words, "<u4").tobytes()
    blob = body + struct.pack("<I", zlib.crc32(body))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(blob)


@dataclasses.dataclass
class LoadedModel:
    """A runnable sparse random network: frozen weights from the seed, one binary mask."""

    header: dict
    model: Any
    variables: dict

    def logits(self, x) -> jax.Array:
        return self.model.apply(self.variables, jnp.asarray(x))

    def predict(self, x) -> np.ndarray:
        return np.asarray(jnp.argmax(self.logits(x), -1))

    @property
    def mask_flat(self) -> np.ndarray:
        return (models.flat(self.variables["params"]) > 0).astype(np.uint8)


def _fail(path: str, why: str):
    raise ModelFileError(f"{path}: {why}; it is not a usable fedmask_jax model file")


# What a model file may describe. A CRC only detects accidents: a header is checked field by
# field against these before anything is allocated or built.
MAX_ENTRIES = 2**28  # 14x Conv10's 19,197,092
_ARCH_KEYS = {"name", "num_classes", "width", "mlp_hidden", "weight_init", "mask_gradient"}
_HEADER_KEYS = {"architecture", "input_shape", "seed", "mask_kind", "num_params", "ones", "num_words"}


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_header(path: str, header) -> None:
    """Every field's type and bounds, and the mask length the architecture implies (from
    shapes alone), or ``ModelFileError`` naming the field."""
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        _fail(path, f"header fields {sorted(header) if isinstance(header, dict) else type(header).__name__}, "
                    f"expected {sorted(_HEADER_KEYS)}")
    arch = header["architecture"]
    if not isinstance(arch, dict) or not set(arch) <= _ARCH_KEYS or "name" not in arch:
        _fail(path, f"architecture {arch!r}: expected the keys {sorted(_ARCH_KEYS)}")
    checks = {
        "architecture.name": arch["name"] in models.MODELS,
        "architecture.num_classes": _int(arch.get("num_classes"), 2, 100_000),
        "architecture.width": isinstance(arch.get("width", 1.0), (int, float))
        and not isinstance(arch.get("width", 1.0), bool) and 0 < arch.get("width", 1.0) <= 64,
        "architecture.mlp_hidden": isinstance(arch.get("mlp_hidden", []), list)
        and len(arch.get("mlp_hidden", [])) <= 16
        and all(_int(h, 1, 1_000_000) for h in arch.get("mlp_hidden", [])),
        "architecture.weight_init": arch.get("weight_init", "signed_constant") in models.WEIGHT_INITS,
        "architecture.mask_gradient": arch.get("mask_gradient", "reference") in masking.GRADIENTS,
        "input_shape": isinstance(header["input_shape"], list) and len(header["input_shape"]) == 3
        and all(_int(d, 1, 4096) for d in header["input_shape"])
        and int(np.prod(header["input_shape"])) <= 2**24,
        "seed": _int(header["seed"], 0, 2**63 - 1),
        "mask_kind": header["mask_kind"] in MASK_KINDS,
        "num_params": _int(header["num_params"], 1, MAX_ENTRIES),
        "num_words": _int(header["num_words"], 0, MAX_ENTRIES),
    }
    for field, ok in checks.items():
        if not ok:
            value = arch.get(field.split(".")[1]) if field.startswith("architecture.") else header[field]
            _fail(path, f"header field {field} = {value!r} is not allowed")
    if not _int(header["ones"], 0, header["num_params"]):
        _fail(path, f"header field ones = {header['ones']!r} is not a count of 0..num_params")
    entries = _architecture_entries(arch, header["input_shape"])
    if entries != header["num_params"]:
        _fail(path, f"the architecture has {entries:,} mask entries, the header says {header['num_params']:,}")


def _architecture_entries(arch: dict, input_shape) -> int:
    """Mask entries of an architecture, from its shapes alone (nothing is allocated)."""
    model = models.build_model(**arch)
    sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.uint8)
    shapes = jax.eval_shape(lambda k, x: models.init_model_variables(model, x, k),
                            jax.random.key(0), sample)
    return models.count_entries(shapes["params"])


def load_model(path: str) -> LoadedModel:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:  # a folder, a missing file: named like every other bad model file
        raise ModelFileError(f"{path}: {e.strerror or e}; give the path of a model file "
                             "(<workdir>/model.fmjx)") from None
    fixed = len(MAGIC) + 6
    if len(blob) < fixed + 4:
        _fail(path, f"only {len(blob)} bytes (truncated)")
    if blob[: len(MAGIC)] != MAGIC:
        _fail(path, "wrong magic number")
    version, header_len = struct.unpack("<HI", blob[len(MAGIC):fixed])
    if version != VERSION:
        _fail(path, f"format version {version}, this fedmask_jax reads version {VERSION}")
    (crc,) = struct.unpack("<I", blob[-4:])
    if zlib.crc32(blob[:-4]) != crc:
        _fail(path, "CRC mismatch (truncated or corrupted)")
    try:
        header = json.loads(blob[fixed:fixed + header_len])
    except ValueError as e:
        _fail(path, f"unreadable header ({e})")
    _check_header(path, header)
    n, words_n = header["num_params"], header["num_words"]
    payload = blob[fixed + header_len:-4]
    if len(payload) != 4 * words_n:
        _fail(path, f"mask payload is {len(payload)} bytes, header says {4 * words_n}")
    mask = coding.decode_global(header["ones"], np.frombuffer(payload, "<u4"), n)
    if int(mask.sum()) != header["ones"]:
        _fail(path, "decoded mask disagrees with its header")

    model = models.build_model(**header["architecture"]).clone(mask_mode="threshold")
    sample = jnp.zeros((1, *header["input_shape"]), jnp.uint8)
    variables = models.init_model_variables(model, sample, keys.server_key(header["seed"]))
    if models.count_entries(variables["params"]) != n:
        _fail(path, "mask size does not match its architecture")
    # A +1/-1 score per entry makes the thresholded mask exactly the stored one.
    scores = models.unflat(np.where(mask > 0, 1.0, -1.0).astype(np.float32), variables["params"])
    return LoadedModel(header, model, {"params": scores, "frozen": variables["frozen"]})
