"""Transparent huge pages for the host buffers of a run, by re-executing the CLI once.

XLA:CPU allocates each program's temporaries afresh at every execution, with glibc's malloc;
allocations above 32 MiB always come from a new mmap, and the kernel then faults in and zeroes
every 4 KiB page on first touch. A Conv4 round on the CPU spends about a tenth of its CPU time
in those faults (docs/benchmarks.md, "Huge pages"). Where transparent huge pages are in
``madvise`` mode (the default of most distributions), glibc >= 2.35 asks for them when the
tunable ``glibc.malloc.hugetlb=1`` is set -- but glibc reads tunables only when a process
starts, so the entry points call ``ensure()`` first thing, which re-executes the same command
line with the tunable set, once (the environment carries it to every subprocess too).

It changes where buffers live, not what is computed. ``FEDMASK_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FEDMASK_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), or None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def wanted(environ=os.environ, mode: str | None = None, glibc: tuple[int, int] | None = None) -> bool:
    """Whether re-executing with the tunable would change anything here."""
    if environ.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    mode = mode if mode is not None else thp_mode()
    glibc = glibc if glibc is not None else glibc_version()
    # 'always' already gives huge pages, 'never' cannot; older glibc has no such tunable.
    return sys.platform.startswith("linux") and mode == "madvise" and glibc is not None and glibc >= (2, 35)


def tunables_with_hugetlb(current: str) -> str:
    return ":".join(filter(None, [current, TUNABLE]))


def ensure() -> None:
    """Re-executes this process's command line with glibc's THP tunable where it helps; returns
    (doing nothing) where it would not, or when already set. Call before heavy imports."""
    if not wanted():
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables_with_hugetlb(os.environ.get("GLIBC_TUNABLES", "")))
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # cannot re-execute (unusual sandboxes): run on without huge pages
        return
