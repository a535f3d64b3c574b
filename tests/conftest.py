import os
import pathlib

# Tests run on the CPU even where an accelerator is present, and without preallocating it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite compiles the same small programs many times, in this process and in the
# subprocesses it starts (which inherit the environment): JAX's persistent compilation cache
# turns a repeat from ~5 s of XLA compilation into a fraction of a second. It lives in the
# checkout (ignored by git), so a fresh clone starts empty.
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax-tests"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# A test's programs are small and run a few steps, so compiling them is most of the suite's
# time, and LLVM's -O2 passes are much of XLA:CPU's compile time. The suite's programs (and
# its subprocesses', which inherit the environment) are compiled at -O1: much faster to
# compile, and rounded as at -O2 but for the last bits of some sums over a model (measured in
# docs/benchmarks.md, "The suite"). -O0 was not taken: it rounds elementwise ops differently,
# and sampled masks then diverge.
#
# XLA:CPU's older fusion emitters (LLVM IR written directly) compile faster than its MLIR-based
# ones, and give the same records but for the last bits of the same sums (docs/benchmarks.md).
# Their switch is a debug flag whose name changes between jaxlib releases, and XLA aborts on a
# flag it does not know: it is set only on the release where it was checked (the suite is just
# slower on others).
def _with_flag(name: str, flag: str) -> None:
    if name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _jaxlib_release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ".".join(version("jaxlib").split(".")[:2])
    except PackageNotFoundError:
        return ""


_with_flag("xla_backend_optimization_level", "--xla_backend_optimization_level=1")
if _jaxlib_release() == "0.10":
    _with_flag("xla_cpu_use_fusion_emitters", "--xla_cpu_use_fusion_emitters=false")
    # A deadlock of the 8-device tests (fedmask_jax/host_devices.py) used to wait out XLA's
    # collective timeouts (XLA's default is 40 s); 120 s leaves a slow thread on a loaded
    # machine more room, and fails a hang sooner than the 600 s tried before.
    _with_flag("xla_cpu_collective_timeout_seconds", "--xla_cpu_collective_timeout_seconds=120")
    _with_flag("xla_cpu_collective_call_terminate_timeout_seconds",
               "--xla_cpu_collective_call_terminate_timeout_seconds=120")

import pytest  # noqa: E402


@pytest.fixture
def no_compiling(monkeypatch):
    """Fails a test that reaches compilation: bad input must stop before any compute."""
    from fedmask_jax import engine

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before rejecting the input")
    monkeypatch.setattr(engine.RoundFn, "compile", refuse)


@pytest.fixture(scope="session")
def fashion_mnist_tfds(tmp_path_factory):
    """A TFDS folder with Fashion-MNIST prepared from the Debian package's archives, once for
    the whole suite: preparing it takes ~10 s, and the xdist workers share it (a file lock
    makes the others wait for the first)."""
    import fcntl

    from fedmask_jax.data import load_dataset

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / "fashion_mnist_tfds"
    with open(root / "fashion_mnist_tfds.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load_dataset("fashion_mnist", data_dir=str(folder), download=False)
    return folder


@pytest.fixture
def devices_alone(tmp_path_factory):
    """Held by the tests that run 8 virtual CPU devices or several JAX processes: one of them
    at a time across the xdist workers, so that two such heavy subprocesses do not share the 2
    cores. (Their all-reduce hangs in fresh clones were not this contention but a deadlock in
    XLA:CPU's thread pool: fedmask_jax/host_devices.py.)"""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with open(root / "devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pytest_collection_modifyitems(config, items):
    """The slow tier first: the workers share out the long tests while the queue is full and
    finish on short ones, instead of one worker ending on a minute-long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within
