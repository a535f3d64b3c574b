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
_COMPILE = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_COMPILE}".strip()

import pytest  # noqa: E402


@pytest.fixture
def no_compiling(monkeypatch):
    """Fails a test that reaches compilation: bad input must stop before any compute."""
    from fedmask_jax import engine

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before rejecting the input")
    monkeypatch.setattr(engine.RoundFn, "compile", refuse)


def pytest_collection_modifyitems(config, items):
    """The slow tier first: the workers share out the long tests while the queue is full and
    finish on short ones, instead of one worker ending on a minute-long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within
