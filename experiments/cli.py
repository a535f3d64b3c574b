"""What the entry points do alike: flags that do not parse, and the signals that end a run.

    app.run(main, flags_parser=cli.parse_flags)   # a bad flag: one error: line, exit 2
    cli.stop_on_signals()                         # SIGTERM ends the run as Ctrl-C does

absl's own parser ends a bad flag (``--dataset=bogus``, an unknown flag, a flagfile that is
not there) with "FATAL Flags parsing error" and exit code 1; the entry points promise exit
code 2 and one ``error:`` line for bad input, whichever layer finds it.
"""

from __future__ import annotations

import signal
import sys

from absl import flags

from experiments import exit_codes


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as Ctrl-C raises KeyboardInterrupt there: a batch
    scheduler sends it before it kills a job, and the rounds so far must reach the disk."""


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run``'s ``flags_parser``: absl's parsing, its errors as one ``error:`` line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)


def _once(signum, frame):
    # A signal delivered twice (a terminal's Ctrl-C reaches the whole process group and a
    # parent forwards it too; a scheduler signals every process of a job) must not cut
    # short the cleanup that the first one started: the rest are ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (``Terminated``) once, in the main
    thread. A SIGINT the process inherited as ignored (a background job) stays ignored."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _once)
    signal.signal(signal.SIGTERM, _once)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return exit_codes.TERMINATED if isinstance(interrupt, Terminated) else exit_codes.INTERRUPTED


def what(interrupt: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
