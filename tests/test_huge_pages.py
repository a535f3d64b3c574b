"""fedmask_jax.huge_pages: when the CLIs re-execute themselves with glibc's THP tunable."""

import os
import subprocess
import sys
import textwrap

import pytest

from fedmask_jax import huge_pages


def test_wanted_only_where_it_changes_something():
    assert huge_pages.wanted({}, mode="madvise", glibc=(2, 36)) == sys.platform.startswith("linux")
    assert not huge_pages.wanted({}, mode="always", glibc=(2, 36))  # THP for every mapping already
    assert not huge_pages.wanted({}, mode="never", glibc=(2, 36))
    assert not huge_pages.wanted({}, mode="", glibc=(2, 36))  # no THP file
    assert not huge_pages.wanted({}, mode="madvise", glibc=(2, 34))  # no such tunable before 2.35
    assert not huge_pages.wanted({"FEDMASK_HUGE_PAGES": "0"}, mode="madvise", glibc=(2, 36))
    set_already = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert not huge_pages.wanted(set_already, mode="madvise", glibc=(2, 36))


def test_tunables_keep_the_users_own():
    assert huge_pages.tunables_with_hugetlb("") == "glibc.malloc.hugetlb=1"
    assert huge_pages.tunables_with_hugetlb("glibc.malloc.arena_max=2") == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(str(f)) == "madvise"
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def test_a_program_reexecutes_once_with_its_arguments(tmp_path):
    """The same command line runs again with the tunable set, and only once."""
    if not huge_pages.wanted():
        pytest.skip("huge pages would change nothing on this machine (THP mode or glibc)")
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("start", flush=True)
        from fedmask_jax import huge_pages
        huge_pages.ensure()
        print("args", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
    """))
    env = dict(os.environ, PYTHONPATH=os.getcwd(), GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    out = subprocess.run([sys.executable, str(script), "--a=1", "b"], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    assert out == ["start", "start", "args ['--a=1', 'b'] glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"]
    env["FEDMASK_HUGE_PAGES"] = "0"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    assert out == ["start", "args [] glibc.malloc.arena_max=4"]
