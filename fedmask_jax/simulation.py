"""A whole run: check the settings, build, restore or start, loop, summarise.

Data flows one way: dataset -> partition -> ClientData on the device -> rounds -> records ->
sinks (console, metrics.jsonl, TensorBoard, plots, summary.json). This module wires the
pieces together and knows no method: what a method does on the host arrives as hooks.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import NamedTuple

import jax

from fedmask_jax import experiment, loop, outputs, sinks
from fedmask_jax.checkpoints import Checkpointer
from fedmask_jax.history import History
from fedmask_jax.run_config import RESUME_NEUTRAL, RunConfig

__all__ = ["Outcome", "RunConfig", "execute", "run"]


class Outcome(NamedTuple):
    summary: dict
    experiment: experiment.Experiment
    state: loop.RunState  # the final server and client states, and the history


def run(cfg: RunConfig, extra_sinks: tuple[sinks.Sink, ...] = ()) -> dict:
    """Runs ``cfg`` end to end and returns the summary (also written to the workdir)."""
    return execute(cfg, extra_sinks).summary


def execute(cfg: RunConfig, extra_sinks: tuple[sinks.Sink, ...] = ()) -> Outcome:
    """``run``, also handing back what it built and where it ended."""
    t_start = time.perf_counter()
    workdir = outputs.ensure_writable_dir(cfg.workdir)
    with outputs.WorkdirLock(workdir):
        return _execute(cfg, workdir, t_start, extra_sinks)


def _execute(cfg: RunConfig, workdir: str, t_start: float, extra_sinks) -> Outcome:
    checkpointer = Checkpointer(workdir)
    if cfg.resume:
        _check_same_config(cfg, workdir)
    exp = experiment.build(cfg, workdir=workdir)
    try:
        server, store = exp.initial_state()
        history, start, notes, restored = History(), 0, [], None
        if cfg.resume:  # before compiling: a workdir that cannot be resumed fails at once
            restored = checkpointer.restore_latest(server, store)
        if restored is not None:
            start, server, store, history, notes = restored
        compile_s = exp.compile(server, store)
        header = [exp.describe() + f"; compiled in {compile_s:.1f}s",
                  *filter(None, (h.header() for h in exp.hooks))]
        if cfg.resume:
            header += [f"resume: passed over {n}" for n in notes]
            header.append(f"resume: continuing after round {start} from {checkpointer.folder}"
                          if restored is not None else f"resume: no checkpoint in {checkpointer.folder}; starting afresh")
        else:
            checkpointer.clear()
        _write_config_record(exp, workdir)
        outs = [*sinks.default_sinks(workdir, cfg.rounds, start, verbose=cfg.verbose,
                                     tensorboard=cfg.tensorboard), *extra_sinks]
        for sink in outs:
            sink.open(header)
        save = lambda s: checkpointer.save(s.history.rounds_done, s.server, s.store, s.history)  # noqa: E731
        try:
            state = loop.run_rounds(exp, loop.RunState(server, store, history), outs, save=save)
        except BaseException:
            for sink in outs:
                sink.close(None)
            raise
        summary = _summary(exp, state, compile_s, time.perf_counter() - t_start, workdir)
        for sink in outs:
            summary.update(sink.close(summary))
        return Outcome(summary, exp, state)
    finally:
        exp.close()


def _summary(exp: experiment.Experiment, state: loop.RunState, compile_s: float, total_s: float,
             workdir: str) -> dict:
    cfg, history = exp.cfg, state.history
    times, walls = history.round_times(), history.values("wall_time_s")
    summary = {
        **{f"final_{k}": v for k, v in history.last_evaluation().items()},
        "eval_split": "validation" if cfg.validation_fraction > 0 else "test",
        **history.means(("uplink_bpp", "downlink_bpp")),
        "total_uplink_bits": history.totals().get("cumulative_uplink_bits", 0.0),
        **{k: v for hook in exp.hooks for k, v in hook.finish(state.server, history).items()},
        "rounds": cfg.rounds,
        "rounds_completed": history.rounds_done,
        "diverged_at_round": history.diverged_at(),
        "clients_per_round": cfg.clients_per_round,
        "num_clients": cfg.num_clients,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "algorithm": cfg.algorithm,
        "num_params": exp.algorithm.num_params,
        "seed": cfg.seed,
        "client_chunk_size": exp.engine_config.client_chunk_size,
        "strategy": exp.strategy,
        "num_devices": exp.round_fn.devices,
        "backend": jax.default_backend(),
        "compile_time_s": compile_s,
        "first_round_time_s": times[0],
        "steady_round_time_s": statistics.median(times[1:] or times),
        "steady_wall_time_s": statistics.median(walls[1:] or walls),
        "total_time_s": total_s,
        "workdir": workdir,
        "config": cfg.record(),
    }
    return summary


def _check_same_config(cfg: RunConfig, workdir: str) -> None:
    """``--resume`` continues only the run the workdir holds, unless told otherwise."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path) or cfg.allow_config_change:
        return
    with open(path) as f:
        recorded = _flatten(json.load(f)["config"])
    current = _flatten(json.loads(json.dumps(cfg.record())))
    differ = sorted(k for k in set(recorded) | set(current)
                    if k not in RESUME_NEUTRAL and recorded.get(k) != current.get(k))
    if differ:
        raise ValueError(
            f"--resume: {workdir} was run with different flags: "
            + ", ".join(f"--{k} was {recorded.get(k)!r}, now {current.get(k)!r}" for k in differ)
            + "; pass --allow_config_change to resume anyway, or use another --workdir")


def _flatten(record: dict) -> dict:
    """Run settings and method settings side by side, as flag names."""
    out = {k: v for k, v in record.items() if k != "method"}
    out.update(record.get("method") or {})
    return out


def _write_config_record(exp: experiment.Experiment, workdir: str) -> None:
    """<workdir>/config.json: every resolved setting and the package versions."""
    from importlib import metadata

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-datasets", "constriction",
                "fedmask_jax"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    outputs.write_json_atomic(os.path.join(workdir, "config.json"), {
        "config": exp.cfg.record(), "versions": versions, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "strategy": exp.strategy,
        "client_chunk_size": exp.engine_config.client_chunk_size,
        "collected_messages_per_round": exp.engine_config.collect,
    })
