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


import pytest  # noqa: E402


@pytest.fixture
def no_compiling(monkeypatch):
    """Fails a test that reaches compilation: bad input must stop before any compute."""
    from fedmask_jax import engine

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before rejecting the input")
    monkeypatch.setattr(engine.RoundFn, "compile", refuse)
