"""Runs one federated simulation.

    python -m experiments.run --flagfile=experiments/configs/quickstart.flags

Writes <workdir>/metrics.jsonl (one line per evaluated round), summary.json, config.json,
plots and, for mask methods, the final model file. Every flag is a field of
``fedmask_jax.run_config.RunConfig`` or of a method's config (``--help`` lists them).

Exit codes (``experiments.exit_codes``): 0 done; 2 bad input (a flag absl cannot parse
included), missing data, a workdir in use or not resumable, a full disk (one ``error:`` line);
3 a check found the results wrong (RunFault); 4 the run diverged (its results are written);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), each with one line and the rounds so far
on disk.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import errno
import sys

from absl import app, flags, logging

from experiments import cli, exit_codes
from fedmask_jax import config as config_lib
from fedmask_jax.algorithms.base import RunFault
from fedmask_jax.data import DataError
from fedmask_jax.run_config import RunConfig, config_from_flags as _from_flags, define_flags

F = flags.FLAGS
define_flags(F)
flags.adopt_module_key_flags(config_lib)  # --help lists them as this program's flags
flags.DEFINE_bool("distributed", False, "One of several processes of one run: call "
                  "jax.distributed.initialize() first; the round's mesh spans every process's "
                  "devices and only process 0 writes (see README; experiments.multiprocess starts "
                  "them on one host).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0's "
                    "coordination service (default: $JAX_COORDINATOR_ADDRESS or the cluster's).")
flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes the run has "
                     "(default: from the cluster environment).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 .. "
                     "--num_processes - 1 (default: from the cluster environment).", lower_bound=0)


def config_from_flags() -> RunConfig:
    return _from_flags(F)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TFDS and JAX log every file they open at INFO
    try:
        cfg = config_from_flags()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    given = [f"--{n}" for n in ("coordinator_address", "num_processes", "process_id") if F[n].present]
    if given and not F.distributed:
        print(f"error: {', '.join(given)} need{'s' if len(given) == 1 else ''} --distributed", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    if F.distributed:
        from fedmask_jax import distributed

        try:  # before any JAX computation
            distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)
        except (ValueError, TypeError, RuntimeError) as e:
            print(f"error: --distributed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
            sys.exit(exit_codes.BAD_INPUT)
    from fedmask_jax.simulation import run

    cli.stop_on_signals()
    try:
        summary = run(cfg)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    except RunFault as e:
        print(f"error: {e}; the rounds before it are in {cfg.workdir}", file=sys.stderr)
        sys.exit(exit_codes.RUN_FAULT)
    except KeyboardInterrupt as e:
        print(f"{cli.what(e)}: the rounds so far are in {cfg.workdir}"
              + (" (continue with --resume)" if cfg.checkpoint_every else ""), file=sys.stderr)
        sys.exit(cli.exit_code(e))
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"error: {e.filename or cfg.workdir}: {e.strerror or e}"
              + ("; free some space or choose another --workdir" if full else ""), file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    if summary["diverged_at_round"] is not None:
        sys.exit(exit_codes.DIVERGED)  # results written; the warning said where and why


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
