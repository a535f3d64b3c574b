"""Runs several experiments.run points that share every shape as one program per batch.

    python -m experiments.run_batch --batch_file=<sweep_dir>/.batches/<group>.json

Started by ``experiments.sweep`` for each group of points with one ``shape_key``. The file
lists each point's experiments.run arguments and workdir; the points run in batches of at
most ``max_runs_per_program`` (0: as many as fit the device memory budget, see
``engine.plan_execution``), each batch one compiled program with a leading runs axis,
one batch after another in this process. Every point writes into its own workdir what
experiments.run writes there (console lines go to its sweep_log.txt); a batch keeps its
checkpoints in ``<batches_dir>/<batch id>`` and resumes from them.

Exit codes (``experiments.exit_codes``): as experiments.run (0 done, 2 bad input, 3 a check
failed, 4 some run diverged, 130 interrupted, 143 terminated), and 5: these points cannot share
a program here (nothing was run).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports: it may re-execute this command
    from fedmask_jax import huge_pages

    huge_pages.ensure()

import hashlib
import json
import os
import sys

from absl import app, flags, logging

from experiments import cli, exit_codes
from experiments.launch import LOG_NAME, parse_point

F = flags.FLAGS
flags.DEFINE_string("batch_file", None, "JSON file written by experiments.sweep.")


def batch_id(workdirs: list[str]) -> str:
    """A batch's name: the same points give the same name, so a re-run resumes it."""
    return hashlib.sha1("\n".join(sorted(os.path.abspath(w) for w in workdirs)).encode()).hexdigest()[:12]


def batches(cfgs, max_runs: int) -> list[list[int]]:
    """Consecutive slices of at most ``max_runs`` points; finished points drop out of a group
    from its front, so an interrupted batch is the same batch when the sweep is re-run."""
    return [list(range(i, min(i + max_runs, len(cfgs)))) for i in range(0, len(cfgs), max_runs)]


def method_entries(cfg, dataset) -> tuple[int, bool]:
    """The entries a run of ``cfg`` trains and sends (its algorithm's ``num_params``, which
    build plans by), from the model's shapes alone, and whether the model has convolutions."""
    import jax

    from fedmask_jax import models
    from fedmask_jax.algorithms import registry

    arch = models.Architecture(cfg.model, dataset.num_classes, dataset.input_shape, cfg.width,
                               tuple(cfg.mlp_hidden))
    variables = jax.eval_shape(arch.build(masked=registry.spec(cfg.algorithm).masked).init,
                               jax.random.key(0), arch.sample_input())
    return models.count_entries(variables["params"]), arch.conv  # a masked model's scores, not its frozen weights


def runs_per_program(cfgs, dataset, requested: int) -> int:
    """How many of ``cfgs`` one program holds here (``engine.plan_execution``, sized as build
    sizes a run; 0: they run one at a time); ``requested``: the sweep's --max_runs_per_program
    (0: as many as fit)."""
    from fedmask_jax import engine

    num_params, conv = method_entries(cfgs[0], dataset)
    plan = engine.plan_execution(cfgs[0], runs=len(cfgs), num_params=num_params, conv=conv,
                                 max_runs_per_program=requested)
    return plan.runs_per_program


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fedmask_jax.algorithms.base import RunFault
    from fedmask_jax.data import DataError, load_dataset
    from fedmask_jax.simulation import execute_runs

    with open(F.batch_file) as f:
        spec = json.load(f)
    try:
        cfgs = [parse_point(p["argv"]) for p in spec["points"]]
        cfg = cfgs[0]
        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir,
                               archive_dirs=[cfg.archive_dir] if cfg.archive_dir else [],
                               download=cfg.download)
        max_runs = runs_per_program(cfgs, dataset, spec.get("max_runs_per_program", 0))
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    if not max_runs:
        print("these points run one at a time here (--strategy resolves to host_loop)", file=sys.stderr)
        sys.exit(exit_codes.CANNOT_SHARE)
    diverged = False
    cli.stop_on_signals()
    for members in batches(cfgs, max_runs):
        group = [cfgs[i] for i in members]
        names = [spec["points"][i]["name"] for i in members]
        batch_dir = os.path.join(spec["batches_dir"], batch_id([c.workdir for c in group]))
        print(f"batch {os.path.basename(batch_dir)}: {len(group)} runs in one program: {', '.join(names)}",
              flush=True)
        try:
            summaries, *_ = execute_runs(group, batch_dir=batch_dir, console_to_log=LOG_NAME)
        except (ValueError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(exit_codes.BAD_INPUT)
        except RunFault as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(exit_codes.RUN_FAULT)
        except KeyboardInterrupt as e:
            print(f"{cli.what(e)}: the rounds so far are in each point's workdir", file=sys.stderr)
            sys.exit(cli.exit_code(e))
        for name, s in zip(names, summaries):
            diverged |= s["diverged_at_round"] is not None
            print(f"  {name}: final accuracy {s.get('final_test_accuracy', float('nan')):.4f}", flush=True)
    if diverged:
        sys.exit(exit_codes.DIVERGED)


if __name__ == "__main__":
    flags.mark_flag_as_required("batch_file")
    app.run(main, flags_parser=cli.parse_flags)
