import gzip
import os
import zipfile

import numpy as np
import pytest

from fedmask_jax.data import DataError, archives, datasets, load_dataset, splits

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _assert_disjoint(parts, total=None):
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat))
    if total is not None:
        assert len(flat) == total


def test_iid_split_is_an_equal_disjoint_cover():
    parts = splits.partition(_labels(), 7, "iid", seed=0)
    _assert_disjoint(parts, 1000)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_noniid_split_follows_the_reference():
    y = np.repeat(np.arange(10), 600)
    parts = splits.partition(y, 10, "noniid", seed=1, classes_per_client=2)
    _assert_disjoint(parts)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() > 0.9 * len(y) and sizes.std() > 0  # unequal sizes ~ randint(10, 100)
    classes = [np.unique(y[p]) for p in parts]
    # Mostly two consecutive classes per client (more only when a pool ran dry).
    assert np.median([len(c) for c in classes]) <= 3
    for c in classes:
        if len(c) == 2:
            assert (c[1] - c[0]) % 10 in (1, 9)


def test_dirichlet_split_skews_labels():
    y = np.repeat(np.arange(10), 300)
    parts = splits.partition(y, 10, "dirichlet", seed=0, dirichlet_alpha=0.1)
    _assert_disjoint(parts, len(y))
    top_share = [np.bincount(y[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.4  # iid would give ~0.1
    iid = splits.partition(y, 10, "dirichlet", seed=0, dirichlet_alpha=1000.0)
    assert np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in iid]) < 0.2


def test_cap_and_determinism():
    a = splits.partition(_labels(), 4, "iid", seed=3, max_examples_per_client=50)
    b = splits.partition(_labels(), 4, "iid", seed=3, max_examples_per_client=50)
    assert all(len(p) == 50 for p in a)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def test_bad_split_and_impossible_dirichlet():
    with pytest.raises(ValueError, match="--split"):
        splits.partition(_labels(), 4, "bogus", seed=0)
    with pytest.raises(ValueError, match="--dirichlet_alpha"):
        splits.partition(_labels(50), 40, "dirichlet", seed=0, dirichlet_alpha=0.01)


def _fake_mnist(folder, n_train=40, n_test=20):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        archives.write_idx_gz(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), x)
        archives.write_idx_gz(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), y)
        data[split] = (x, y)
    return data


def _sorted_pairs(x, y):
    order = np.lexsort((x.reshape(len(x), -1).sum(1), y))
    return x[order], y[order]


def test_mnist_builder_reads_local_archives_through_tfds(tmp_path):
    src = _fake_mnist(str(tmp_path / "archives"))
    ds = load_dataset("mnist", data_dir=str(tmp_path / "tfds"),
                      archive_dirs=[str(tmp_path / "archives")], download=False)
    assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (20, 28, 28, 1)
    assert ds.num_classes == 10
    # TFDS may reorder records; the multiset of (image, label) pairs must be identical.
    got = _sorted_pairs(ds.x_train[..., 0], ds.y_train)
    want = _sorted_pairs(*src["train"])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (tmp_path / "tfds" / "mnist" / "1.0.0").is_dir()


def test_cifar10_tarball_reader(tmp_path):
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)] + \
                ["cifar-10-batches-bin/test_batch.bin"]:
        members[name] = (rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 3))
    path = str(tmp_path / "cifar-10-binary.tar.gz")
    archives.write_cifar_tar(path, members)
    out = archives.read_cifar_tar(path, {"train": list(members)[:5], "test": list(members)[5:]}, 1, 0)
    assert out["train"][0].shape == (15, 32, 32, 3)
    np.testing.assert_array_equal(out["test"][0], members["cifar-10-batches-bin/test_batch.bin"][0])
    np.testing.assert_array_equal(out["test"][1], members["cifar-10-batches-bin/test_batch.bin"][1])


def test_emnist_zip_reader_transposes(tmp_path):
    rng = np.random.default_rng(0)
    inner = tmp_path / "gzip"
    inner.mkdir()
    arrays = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 47, 5).astype(np.uint8)
        archives.write_idx_gz(str(inner / f"emnist-balanced-{split}-images-idx3-ubyte.gz"), x)
        archives.write_idx_gz(str(inner / f"emnist-balanced-{split}-labels-idx1-ubyte.gz"), y)
        arrays[split] = (x, y)
    zpath = tmp_path / "gzip.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in inner.iterdir():
            z.write(f, f"gzip/{f.name}")
    out = archives.read_emnist_zip(str(zpath))
    np.testing.assert_array_equal(out["train"][0][..., 0], arrays["train"][0].transpose(0, 2, 1))
    np.testing.assert_array_equal(out["test"][1], arrays["test"][1])


def test_missing_dataset_names_paths_and_fix(tmp_path):
    empty = str(tmp_path / "nothing_here")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path / "tfds"), archive_dirs=[empty], download=False)
    msg = str(e.value)
    assert empty in msg and "cifar-10-binary.tar.gz" in msg and "--archive_dir" in msg


def test_corrupt_archive_fails_clearly(tmp_path):
    folder = tmp_path / "archives"
    _fake_mnist(str(folder))
    victim = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(victim.read_bytes())
    victim.write_bytes(gzip.compress(raw[:-100]))  # truncated payload
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", data_dir=str(tmp_path / "tfds"), archive_dirs=[str(folder)],
                     download=False)
    victim.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip"):
        load_dataset("mnist", data_dir=str(tmp_path / "tfds2"), archive_dirs=[str(folder)],
                     download=False)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_real_fashion_mnist_from_the_debian_package(fashion_mnist_tfds):
    assert os.path.isdir(FMNIST_DIR), "scripts/setup.sh installs dataset-fashion-mnist"
    assert (fashion_mnist_tfds / "fashion_mnist").is_dir()  # prepared there from the archives
    ds = load_dataset("fashion_mnist", data_dir=str(fashion_mnist_tfds), download=False)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.x_train.dtype == np.uint8 and 0.2 < ds.x_train.mean() / 255 < 0.4


def _prepared(tmp_path):
    _fake_mnist(str(tmp_path / "archives"))
    kw = dict(data_dir=str(tmp_path / "tfds"), archive_dirs=[str(tmp_path / "archives")], download=False)
    load_dataset("mnist", **kw)
    files = sorted((tmp_path / "tfds" / "mnist" / "1.0.0").glob("*.array_record*"))
    assert files
    return kw, files


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_prepared_file_is_one_clear_error_naming_its_folder(tmp_path, damage):
    kw, files = _prepared(tmp_path)
    blob = bytearray(files[-1].read_bytes())
    if damage == "flip":
        at = len(blob) // 3
        blob[at: at + 64] = bytes(b ^ 0xFF for b in blob[at: at + 64])
    else:
        blob = blob[: len(blob) // 2]
    files[-1].write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"mnist.*1\.0\.0.*delete .* to rebuild") as e:
        load_dataset("mnist", **kw)
    assert len(str(e.value)) < 600


def test_a_label_out_of_range_names_the_archive_in_one_line(tmp_path):
    folder = tmp_path / "archives"
    _fake_mnist(str(folder))
    labels = np.zeros(40, np.uint8)
    labels[7] = 200
    archives.write_idx_gz(str(folder / "train-labels-idx1-ubyte.gz"), labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*1 train label\(s\) outside 0\.\.9 "
                                        r"\(e\.g\. 200 at example 7\)") as e:
        load_dataset("mnist", data_dir=str(tmp_path / "tfds"), archive_dirs=[str(folder)], download=False)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


def test_offline_download_fails_at_once(tmp_path, monkeypatch):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="there is no network .*Network is unreachable.*To fix"):
        load_dataset("cifar10", data_dir=str(tmp_path / "tfds"), archive_dirs=[empty], download=True)
    assert time.perf_counter() - t0 < 30


def test_digits_are_read_as_scikit_learns_load_digits_reads_them():
    from sklearn.datasets import load_digits

    pixels, target = datasets._sklearn_digits()
    reference = load_digits()
    np.testing.assert_array_equal(pixels, reference.data)
    np.testing.assert_array_equal(target, reference.target)
    assert pixels.dtype == reference.data.dtype and target.dtype == reference.target.dtype
