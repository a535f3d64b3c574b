"""Datasets as numpy arrays, built through TFDS (array_record, no TensorFlow needed).

Each image dataset has a TFDS builder that keeps the stock name (``mnist``,
``fashion_mnist``, ``emnist``, ``cifar10``, ``cifar100``), reads the *original* archives
with gzip/numpy (from a local folder, the Debian package folder for Fashion-MNIST, or a
download when online) and writes array_record files that ``builder.as_data_source()`` reads
back with random access. The stock builders cannot be used here: their extraction and
tfrecord writing need TensorFlow, and the Debian copy of Fashion-MNIST fails their checksum.

``digits`` (scikit-learn's 1,797 real 8x8 digits) needs no builder; it is for tiny tests.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from fedmask_jax.data import archives
from fedmask_jax.data.archives import DataError

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_CIFAR10_MEMBERS = {
    "train": [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["cifar-10-batches-bin/test_batch.bin"],
}
_CIFAR100_MEMBERS = {"train": ["cifar-100-binary/train.bin"],
                     "test": ["cifar-100-binary/test.bin"]}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset in memory: uint8 NHWC images, int labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """Where a dataset's original archives come from and how to read them."""

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    files: tuple[str, ...]  # names that must all be present in one folder
    urls: dict[str, str]
    system_dirs: tuple[str, ...]
    read: Callable[[dict[str, str]], dict]  # {file name: path} -> {split: (x, y)}
    how_to_get: str


def _mnist_reader(transpose=False):
    def read(paths):
        folder = os.path.dirname(next(iter(paths.values())))
        return archives.read_mnist_like(folder, _MNIST_FILES, transpose)
    return read


SPECS: dict[str, ArchiveSpec] = {
    "mnist": ArchiveSpec(
        "mnist", (28, 28, 1), 10, tuple(_MNIST_FILES.values()),
        {f: f"https://storage.googleapis.com/cvdf-datasets/mnist/{f}" for f in _MNIST_FILES.values()},
        ("/usr/share/datasets/mnist",), _mnist_reader(),
        "put the four MNIST IDX .gz files in --archive_dir",
    ),
    "fashion_mnist": ArchiveSpec(
        "fashion_mnist", (28, 28, 1), 10, tuple(_MNIST_FILES.values()),
        {f: f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}"
         for f in _MNIST_FILES.values()},
        ("/usr/share/datasets/fashion-mnist",), _mnist_reader(),
        "on Debian/Ubuntu run `apt-get install dataset-fashion-mnist`, or put the four "
        "Fashion-MNIST IDX .gz files in --archive_dir",
    ),
    "emnist": ArchiveSpec(
        "emnist", (28, 28, 1), 47, ("gzip.zip",),
        {"gzip.zip": "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"},
        (), lambda p: archives.read_emnist_zip(p["gzip.zip"], "balanced"),
        "put EMNIST's original gzip.zip in --archive_dir",
    ),
    "cifar10": ArchiveSpec(
        "cifar10", (32, 32, 3), 10, ("cifar-10-binary.tar.gz",),
        {"cifar-10-binary.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"},
        (), lambda p: archives.read_cifar_tar(p["cifar-10-binary.tar.gz"], _CIFAR10_MEMBERS, 1, 0),
        "put cifar-10-binary.tar.gz in --archive_dir",
    ),
    "cifar100": ArchiveSpec(
        "cifar100", (32, 32, 3), 100, ("cifar-100-binary.tar.gz",),
        {"cifar-100-binary.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"},
        (), lambda p: archives.read_cifar_tar(p["cifar-100-binary.tar.gz"], _CIFAR100_MEMBERS, 2, 1),
        "put cifar-100-binary.tar.gz in --archive_dir",
    ),
}
DATASETS = (*SPECS, "digits")


def _find_archives(spec: ArchiveSpec, archive_dirs: Sequence[str]) -> tuple[dict | None, list[str]]:
    tried = []
    for folder in [*archive_dirs, *spec.system_dirs]:
        folder = os.path.expanduser(folder)
        paths = {f: os.path.join(folder, f) for f in spec.files}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths, tried
        tried.append(folder)
    return None, tried


def _builder_class(spec: ArchiveSpec):
    import tensorflow_datasets as tfds

    class ArchiveBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = spec.name
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Built by fedmask_jax from the original archives, no TF."}

        def __init__(self, *, archive_dirs: Sequence[str] = (), download: bool = True, **kw):
            self._archive_dirs = tuple(archive_dirs)
            self._download = download
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    # Tensor, not Image: Image's PNG encoding needs TensorFlow.
                    "image": tfds.features.Tensor(shape=spec.shape, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=spec.num_classes),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            paths, tried = _find_archives(spec, self._archive_dirs)
            if paths is None:
                if not self._download:
                    raise DataError(_missing_message(spec, tried, "downloads disabled"))
                offline = _unreachable(spec.urls)
                if offline:  # fail in seconds, not after minutes of retries
                    raise DataError(_missing_message(spec, tried, f"there is no network ({offline})"))
                try:
                    paths = {f: os.fspath(p) for f, p in dl_manager.download(spec.urls).items()}
                except Exception as e:  # noqa: BLE001 -- any download failure means "offline"
                    raise DataError(_missing_message(spec, tried, f"download failed: {e}")) from e
            splits = spec.read(paths)
            _check_splits(spec, splits, sorted(set(paths.values())))
            return {s: self._generate_examples(*splits[s]) for s in ("train", "test")}

        def _generate_examples(self, images, labels):
            for i, (img, lab) in enumerate(zip(images, labels)):
                yield i, {"image": img.reshape(spec.shape), "label": int(lab)}

    return ArchiveBuilder


def _unreachable(urls: dict[str, str], timeout: float = 5.0) -> str | None:
    """Why the first URL's host cannot be reached (None when it can): a quick probe, so an
    offline machine is told at once instead of after the downloader's retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(next(iter(urls.values())))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {url.hostname}:{port}: {e.strerror or e}"
    return None


def _check_splits(spec: ArchiveSpec, splits: dict, files: list[str]) -> None:
    """Images of the dataset's shape and labels among its classes, or a DataError naming the
    archives (before TFDS turns a bad label into a page-long array dump)."""
    for split in ("train", "test"):
        x, y = splits[split]
        if tuple(x.shape[1:]) != spec.shape or len(x) != len(y) or len(y) == 0:
            raise DataError(f"{', '.join(files)}: {split} images {x.shape} / labels {y.shape} are not "
                            f"{spec.name}'s {spec.shape} images; the archives are corrupt or another dataset's")
        bad = np.flatnonzero((y < 0) | (y >= spec.num_classes))
        if len(bad):
            raise DataError(f"{', '.join(files)}: {len(bad)} {split} label(s) outside 0..{spec.num_classes - 1} "
                            f"(e.g. {int(y[bad[0]])} at example {int(bad[0])}); the archives are corrupt "
                            "or another dataset's")


def _missing_message(spec: ArchiveSpec, tried: list[str], why: str) -> str:
    return (f"dataset {spec.name!r}: could not find {', '.join(spec.files)} in "
            f"{tried or ['(no folders)']} and {why}. To fix: {spec.how_to_get}.")


_PREPARED_DIGESTS = "fedmask_jax.sha256.json"


def _verify_prepared(name: str, folder: str) -> None:
    """Checks the prepared files against the SHA-256s recorded when they were first read
    (recording them then): array_record has no checksum of its own, so a damaged byte would
    otherwise be read as a different image."""
    import hashlib
    import json

    def digests() -> dict[str, str]:
        out = {}
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry != _PREPARED_DIGESTS and os.path.isfile(path):
                with open(path, "rb") as f:
                    out[entry] = hashlib.sha256(f.read()).hexdigest()
        return out

    record = os.path.join(folder, _PREPARED_DIGESTS)
    found = digests()
    if not os.path.isfile(record):
        tmp = record + ".tmp"
        with open(tmp, "w") as f:
            json.dump(found, f, indent=1, sort_keys=True)
        os.replace(tmp, record)
        return
    try:
        with open(record) as f:
            expected = dict(json.load(f))
    except (OSError, ValueError, TypeError):
        expected = {}
    damaged = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if damaged or not expected:
        what = f"{damaged[0]} differs from" if damaged else "no readable"
        raise DataError(f"dataset {name!r}: {os.path.join(folder, damaged[0] if damaged else _PREPARED_DIGESTS)}: "
                        f"{what} the SHA-256 recorded when it was prepared; delete {folder} to rebuild "
                        "it from the original archives")


def load_digits(seed: int = 0, test_size: int = 297) -> Dataset:
    """scikit-learn's 8x8 digits as uint8 images, with a fixed train/test split."""
    pixels, target = _sklearn_digits()
    images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[test_size:], order[:test_size]
    return Dataset("digits", images[train], target[train].astype(np.int32),
                   images[test], target[test].astype(np.int32), 10)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits file, read as its ``load_digits`` reads it (a gzipped CSV, the
    label last), without importing scikit-learn: that import (scipy with it) is about 2 s of
    every digits run's start, the tests' subprocesses among them."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") \
        if spec and spec.submodule_search_locations else None
    if path is None or not os.path.isfile(path):
        from sklearn.datasets import load_digits as sk_load  # its own error if it is missing

        d = sk_load()
        return d.data, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def load_dataset(name: str, *, data_dir: str | None = None, archive_dirs: Sequence[str] = (),
                 download: bool = True) -> Dataset:
    """Loads ``name`` as numpy arrays, building its TFDS array_record files on first use.

    ``data_dir`` is TFDS's data folder (default ``~/tensorflow_datasets``); ``archive_dirs``
    are searched for the original archives before the system folders and the download.
    """
    if name == "digits":
        return load_digits()
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    spec = SPECS[name]
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    builder = _builder_class(spec)(
        data_dir=data_dir, file_format="array_record", archive_dirs=archive_dirs,
        download=download,
    )
    try:
        builder.download_and_prepare()
    except Exception as e:
        # TFDS wraps errors raised in _split_generators; surface our own message unwrapped.
        cause = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise DataError(f"dataset {name!r}: preparing its files in {builder.data_dir} failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); "
                        f"delete {builder.data_dir} to rebuild them from the original archives") from None
    _verify_prepared(name, builder.data_dir)
    try:
        sources = builder.as_data_source()
        arrays = []
        for split in ("train", "test"):
            src = sources[split]
            records = src.__getitems__(list(range(len(src))))
            arrays.append(np.stack([r["image"] for r in records]).astype(np.uint8))
            arrays.append(np.array([r["label"] for r in records], np.int32))
    except Exception as e:  # noqa: BLE001 -- array_record, TFDS and numpy each fail their own way
        raise DataError(
            f"dataset {name!r}: its prepared files in {builder.data_dir} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); delete "
            f"{builder.data_dir} to rebuild them from the original archives") from None
    dataset = Dataset(name, *arrays, num_classes=spec.num_classes)
    for split, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
        if tuple(x.shape[1:]) != spec.shape or not ((y >= 0) & (y < spec.num_classes)).all():
            raise DataError(f"dataset {name!r}: the {split} split in {builder.data_dir} does not hold "
                            f"{spec.shape} images with labels 0..{spec.num_classes - 1}; delete "
                            f"{builder.data_dir} to rebuild it")
    return dataset


def holdout_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Moves a random ``fraction`` of the training set into the evaluation slot.

    For tuning hyperparameters without looking at the test set: the returned dataset trains
    on the rest and evaluates on the held-out part (its ``x_test``/``y_test``).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng([seed, 7]).permutation(len(dataset.y_train))
    held = int(round(fraction * len(order)))
    val, train = np.sort(order[:held]), np.sort(order[held:])
    return dataclasses.replace(
        dataset, name=f"{dataset.name}[validation]", x_train=dataset.x_train[train],
        y_train=dataset.y_train[train], x_test=dataset.x_train[val], y_test=dataset.y_train[val])
