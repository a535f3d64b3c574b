"""The final model as one file: frozen-weight seed + architecture + one range-coded mask.

Layout (little-endian):

    8 bytes   magic b"FMJXMASK"
    2 bytes   format version (1)
    4 bytes   header length H
    H bytes   header, UTF-8 JSON: architecture, seed, mask kind, entry count, ones, words
    4*W bytes the mask, range-coded with its own frequency (fedmask_jax.coding, global code)
    4 bytes   CRC-32 of everything above

Loading checks every length, the magic, the version, the CRC and the decoded count of ones,
so a truncated or altered file raises ``ModelFileError`` instead of producing a wrong model.
The frozen weights are not stored: they are regenerated from the seed exactly as the run
made them (``fedpm.init_model_variables`` with ``keys.server_key(seed)``).
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

from fedmask_jax import coding, keys, models
from fedmask_jax.algorithms import fedpm as fedpm_lib

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
        return (fedpm_lib.flat(self.variables["params"]) > 0).astype(np.uint8)


def _fail(path: str, why: str):
    raise ModelFileError(f"{path}: {why}; it is not a usable fedmask_jax model file")


def load_model(path: str) -> LoadedModel:
    with open(path, "rb") as f:
        blob = f.read()
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
        n, words_n = int(header["num_params"]), int(header["num_words"])
    except (ValueError, KeyError, TypeError) as e:
        _fail(path, f"unreadable header ({e})")
    payload = blob[fixed + header_len:-4]
    if len(payload) != 4 * words_n:
        _fail(path, f"mask payload is {len(payload)} bytes, header says {4 * words_n}")
    mask = coding.decode_global(header["ones"], np.frombuffer(payload, "<u4"), n)
    if int(mask.sum()) != header["ones"]:
        _fail(path, "decoded mask disagrees with its header")

    model = models.build_model(**header["architecture"]).clone(mask_mode="threshold")
    sample = jnp.zeros((1, *header["input_shape"]), jnp.uint8)
    variables = fedpm_lib.init_model_variables(model, sample, keys.server_key(header["seed"]))
    if models.count_entries(variables["params"]) != n:
        _fail(path, "mask size does not match its architecture")
    # A +1/-1 score per entry makes the thresholded mask exactly the stored one.
    scores = fedpm_lib.unflat(np.where(mask > 0, 1.0, -1.0).astype(np.float32), variables["params"])
    return LoadedModel(header, model, {"params": scores, "frozen": variables["frozen"]})
