"""Readers for the original dataset archives (IDX gzip, EMNIST zip, CIFAR binary tarballs).

They use only gzip/zipfile/tarfile and numpy, so they run without TensorFlow, and they check
every size and magic number so that a truncated or foreign file fails with a message naming
it instead of yielding a wrong dataset.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile

import numpy as np


class DataError(RuntimeError):
    """A dataset is missing or unreadable. The message says which files and how to fix it."""


def _gunzip(path: str, data: bytes | None = None) -> bytes:
    try:
        if data is None:
            with gzip.open(path, "rb") as f:
                return f.read()
        return gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: not a readable gzip file ({e}); delete it and fetch it again") from e


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Parses an IDX file (the MNIST family's format): uint8 payload with a typed header."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{name}: IDX payload is {len(raw)} bytes, header says {expected}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx_gz(path: str) -> np.ndarray:
    return parse_idx(_gunzip(path), path)


def read_mnist_like(folder: str, files: dict[str, str], transpose: bool = False):
    """Reads {split: (images, labels)} from IDX .gz files in ``folder``."""
    out = {}
    for split in ("train", "test"):
        images = read_idx_gz(os.path.join(folder, files[f"{split}_images"]))
        labels = read_idx_gz(os.path.join(folder, files[f"{split}_labels"]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} images {images.shape} and labels "
                            f"{labels.shape} do not match")
        if transpose:  # EMNIST stores images transposed
            images = images.transpose(0, 2, 1)
        out[split] = (images[..., None], labels.astype(np.int64))
    return out


def read_emnist_zip(path: str, subset: str = "balanced"):
    """Reads EMNIST ``subset`` from the original ``gzip.zip`` archive."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {os.path.basename(n): n for n in z.namelist()}
            out = {}
            for split in ("train", "test"):
                arrays = []
                for kind in ("images-idx3", "labels-idx1"):
                    base = f"emnist-{subset}-{split}-{kind}-ubyte.gz"
                    if base not in names:
                        raise DataError(f"{path}: member {base} missing")
                    arrays.append(parse_idx(_gunzip(f"{path}:{base}", z.read(names[base])), base))
                images, labels = arrays
                out[split] = (images.transpose(0, 2, 1)[..., None], labels.astype(np.int64))
            return out
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a readable zip file ({e})") from e


def _cifar_records(raw: bytes, name: str, label_bytes: int, label_index: int):
    record = label_bytes + 3072
    if len(raw) == 0 or len(raw) % record:
        raise DataError(f"{name}: {len(raw)} bytes is not a whole number of {record}-byte "
                        "CIFAR records; the file is truncated or corrupt")
    arr = np.frombuffer(raw, np.uint8).reshape(-1, record)
    images = arr[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, arr[:, label_index].astype(np.int64)


def read_cifar_tar(path: str, members: dict[str, list[str]], label_bytes: int, label_index: int):
    """Reads {split: (images, labels)} from a CIFAR binary-version tarball."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            by_name = {m.name: m for m in tar.getmembers()}
            out = {}
            for split, names in members.items():
                parts = []
                for n in names:
                    if n not in by_name:
                        raise DataError(f"{path}: member {n} missing")
                    parts.append(_cifar_records(tar.extractfile(by_name[n]).read(), f"{path}:{n}",
                                                label_bytes, label_index))
                out[split] = (np.concatenate([p[0] for p in parts]),
                              np.concatenate([p[1] for p in parts]))
            return out
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .tar.gz file ({e}); delete it and fetch it "
                        "again") from e


def write_idx_gz(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX .gz file (used by tests to build small archives)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_cifar_tar(path: str, members: dict[str, tuple[np.ndarray, np.ndarray]],
                    coarse: bool = False) -> None:
    """Writes CIFAR binary records into a .tar.gz (used by tests to build small archives)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, (images, labels) in members.items():
            chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.uint8)
            cols = [labels[:, None].astype(np.uint8)]
            if coarse:
                cols.insert(0, (labels[:, None] // 5).astype(np.uint8))
            raw = np.concatenate(cols + [chw], axis=1).tobytes()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
