"""Builds the oneDNN convolution extension for XLA:CPU (``fedmask_jax/kernels/_onednn_conv.so``).

    python -m fedmask_jax.kernels.build [--quiet] [--force]

Compiles ``onednn_conv.cc`` with the system C++ compiler against jaxlib's FFI headers
(``jax.ffi.include_dir()``) and the oneDNN that pip installed into this environment (PyPI's
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``: the library, GNU OpenMP threading, and its
headers). ``scripts/setup.sh`` runs it; where it cannot build (no compiler, no oneDNN, not
x86-64 Linux) it says why and exits 0, and the models keep XLA's convolution.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "onednn_conv.cc"
TARGET = HERE / "_onednn_conv.so"


class BuildUnavailable(RuntimeError):
    """Something the build needs is missing on this machine."""


def _dist_dir(dist: str, suffix: str) -> Path:
    """The folder holding the file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise BuildUnavailable(f"the Python package {dist} is not installed (pip install {dist})") from None
    for f in files:
        path = Path(f.locate()).resolve()  # RECORD paths of wheel data are relative ("../../")
        if path.as_posix().endswith(suffix):
            return path.parents[suffix.count("/")]
    raise BuildUnavailable(f"{dist} has no file ending in {suffix}")


def onednn_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of the pip-installed oneDNN."""
    include = _dist_dir("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp").joinpath("include")
    lib = _dist_dir("onednn-cpu-gomp", "lib/libdnnl.so.3").joinpath("lib")
    return include, lib


def command(compiler: str = "") -> list[str]:
    import jax.ffi

    cxx = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildUnavailable("no C++ compiler (g++) on PATH")
    include, lib = onednn_dirs()
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden",
            "-isystem", str(jax.ffi.include_dir()), "-isystem", str(include), str(SOURCE), "-o", str(TARGET),
            f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]


def up_to_date() -> bool:
    return TARGET.exists() and TARGET.stat().st_mtime >= SOURCE.stat().st_mtime


def build(quiet: bool = False, force: bool = False) -> Path:
    """Compiles the extension (unless it is newer than its source); raises
    ``BuildUnavailable`` or ``CalledProcessError``."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        raise BuildUnavailable("the oneDNN extension is built for x86-64 Linux only")
    cmd = command()
    if up_to_date() and not force:
        return TARGET
    tmp = TARGET.with_suffix(".so.tmp")
    cmd[cmd.index(str(TARGET))] = str(tmp)
    subprocess.run(cmd, check=True, capture_output=quiet)
    os.replace(tmp, TARGET)  # a half-written library is never loaded
    return TARGET


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="print the compiler's output only on failure")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        path = build(args.quiet, args.force)
    except BuildUnavailable as e:
        print(f"kernels: oneDNN convolution not built ({e}); the models use XLA's convolution")
        return 0
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-5:]
        print("kernels: oneDNN convolution failed to build; the models use XLA's convolution\n  "
              + "\n  ".join(err))
        return 0
    print(f"kernels: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
