"""A whole run: check the settings, build, restore or start, loop, summarise.

Data flows one way: dataset -> partition -> ClientData on the device -> rounds -> records ->
sinks (console, metrics.jsonl, TensorBoard, plots, summary.json). This module wires the
pieces together and knows no method: what a method does on the host arrives as hooks.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import NamedTuple, Sequence

import jax

from fedmask_jax import distributed, experiment, loop, outputs, sinks
from fedmask_jax.algorithms.base import PyTree
from fedmask_jax.checkpoints import Checkpointer
from fedmask_jax.history import SIM_TIME, History
from fedmask_jax.run_config import RESUME_NEUTRAL, RunConfig

__all__ = ["Outcome", "RunConfig", "execute", "execute_runs", "run"]


class Outcome(NamedTuple):
    summary: dict
    experiment: experiment.Experiment
    server: PyTree  # the run's final server state
    history: History


def run(cfg: RunConfig, extra_sinks: tuple[sinks.Sink, ...] = ()) -> dict:
    """Runs ``cfg`` end to end and returns the summary (also written to the workdir)."""
    return execute(cfg, extra_sinks).summary


def execute(cfg: RunConfig, extra_sinks: tuple[sinks.Sink, ...] = ()) -> Outcome:
    """``run``, also handing back what it built and where it ended."""
    summaries, exp, (track,), state = execute_runs([cfg], extra_sinks=[tuple(extra_sinks)])
    return Outcome(summaries[0], exp, exp.part(state.server, 0), track.history)


def execute_runs(cfgs: Sequence[RunConfig], *, batch_dir: str | None = None,
                 extra_sinks: Sequence[tuple[sinks.Sink, ...]] | None = None,
                 console_to_log: str | None = None):
    """Runs ``cfgs`` -- one run, or several sharing every shape, as one program -- each into
    its own workdir; returns (their summaries, the experiment, their tracks, the program's
    final state).

    A batch keeps its checkpoints in ``batch_dir`` (a single run in its workdir);
    ``console_to_log``: each run's console lines go to this file in its workdir instead of
    stdout.
    """
    t_start = time.perf_counter()
    # In a multi-process run (jax.distributed) every process computes the run; only process 0
    # writes its outputs and holds the workdir lock (distributed.py).
    primary = distributed.is_primary()
    folder = outputs.ensure_writable_dir if primary else (lambda p, *_: os.path.abspath(os.path.expanduser(p)))
    workdirs = [folder(c.workdir) for c in cfgs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("runs in one program need one --workdir each")
    holder = workdirs[0] if len(cfgs) == 1 else folder(batch_dir, "batch folder")
    with contextlib.ExitStack() as locks:
        for lock_dir in dict.fromkeys([holder, *workdirs]) if primary else ():
            locks.enter_context(outputs.WorkdirLock(lock_dir))
        checkpointer = Checkpointer(holder, settings=[c.record() for c in cfgs])
        return _execute(list(cfgs), workdirs, checkpointer, t_start,
                        extra_sinks or [()] * len(cfgs), console_to_log, primary)


def _execute(cfgs, workdirs, checkpointer, t_start, extra_sinks, console_to_log, primary=True):
    resume = cfgs[0].resume
    checked = _check_same_config(cfgs, workdirs, checkpointer) if resume else None
    exp = experiment.build(cfgs, workdirs=workdirs if primary else None)  # hooks' files: process 0's
    logs = []
    try:
        server, store = exp.initial_state()
        buffer = exp.initial_buffer(server)
        histories, start, notes, restored = [History() for _ in cfgs], 0, [], None
        if resume:  # before compiling: a workdir that cannot be resumed fails at once
            restored = checkpointer.restore_latest(server, store, len(exp.runs), buffer)
        if restored is not None:
            start, server, store, buffer, histories, notes = restored
            if start != checked:  # a newer checkpoint verified but did not restore
                _check_same_config(cfgs, workdirs, checkpointer, step=start)
        compile_s = exp.compile(server, store, buffer)
        header = [exp.describe() + f"; compiled in {compile_s:.1f}s",
                  *filter(None, (h.header() for h in exp.runs[0].hooks))]
        if resume:
            header += [f"resume: passed over {n}" for n in notes]
            header.append(f"resume: continuing after round {start} from {checkpointer.folder}"
                          if restored is not None else f"resume: no checkpoint in {checkpointer.folder}; starting afresh")
        elif primary:
            checkpointer.clear()
        tracks = []
        for run, history, w, extra in zip(exp.runs, histories, workdirs, extra_sinks):
            c, run_sinks = run.cfg, list(extra)
            if primary:  # the other processes of a multi-process run write nothing
                _write_config_record(exp, run, w)
                log = open(os.path.join(w, console_to_log), "a", buffering=1) if console_to_log and c.verbose else None
                logs += [log] if log else []
                run_sinks[:0] = sinks.default_sinks(w, c.rounds, history, verbose=c.verbose,
                                                    tensorboard=c.tensorboard, plots=c.plots, console=log,
                                                    shows=exp.spec.shows)
            for sink in run_sinks:
                sink.open(header)
            tracks.append(loop.Track(run, history, run_sinks))

        def save(state: loop.State) -> None:
            checkpointer.save(max(t.history.rounds_done for t in tracks), state.server, state.store,
                              [t.history for t in tracks], state.buffer)

        try:
            state = loop.run_rounds(exp, loop.State(server, store, buffer), tracks, save=save,
                                    save_every=cfgs[0].checkpoint_every)
        except BaseException:
            for track in tracks:
                for sink in track.sinks:
                    sink.close(None)
            raise
        summaries = []
        for i, (track, w) in enumerate(zip(tracks, workdirs)):
            summary = _summary(exp, track, exp.part(state.server, i), compile_s, time.perf_counter() - t_start, w)
            for sink in track.sinks:
                summary.update(sink.close(summary))
            summaries.append(summary)
        return summaries, exp, tracks, state
    finally:
        for log in logs:
            log.close()
        exp.close()


def _summary(exp: experiment.Experiment, track: loop.Track, server, compile_s: float,
             total_s: float, workdir: str) -> dict:
    """``server``: the run's final server state."""
    cfg, history = track.cfg, track.history
    times, walls = history.round_times(), history.values("wall_time_s")
    summary = {
        **{f"final_{k}": v for k, v in history.last_evaluation().items()},
        "eval_split": "validation" if cfg.validation_fraction > 0 else "test",
        **history.means(("uplink_bpp", "downlink_bpp")),
        "total_uplink_bits": history.totals().get("cumulative_uplink_bits", 0.0),
        SIM_TIME: history.totals().get(SIM_TIME, 0.0),
        **{k: v for hook in track.run.hooks for k, v in hook.finish(server, history).items()},
        "rounds": cfg.rounds,
        "rounds_completed": history.rounds_done,
        "diverged_at_round": history.diverged_at(),
        "clients_per_round": cfg.clients_per_round,
        "num_clients": cfg.num_clients,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "algorithm": cfg.algorithm,
        "num_params": exp.num_params,
        "seed": cfg.seed,
        "client_chunk_size": exp.engine_config.client_chunk_size,
        "strategy": exp.strategy,
        "num_devices": exp.round_fn.devices,
        "runs_in_program": len(exp.runs),
        "backend": jax.default_backend(),
        "compile_time_s": compile_s,
        "first_round_time_s": times[0] if times else None,
        "steady_round_time_s": statistics.median(times[1:] or times) if times else None,
        "steady_wall_time_s": statistics.median(walls[1:] or walls) if walls else None,
        "total_time_s": total_s,
        "workdir": workdir,
        "config": cfg.record(),
    }
    return summary


def _check_same_config(cfgs: Sequence[RunConfig], workdirs: Sequence[str], checkpointer: Checkpointer,
                       step: int | None = None) -> int | None:
    """``--resume`` continues only the run the workdir holds, unless told otherwise: the
    settings are checked against those the checkpoint to be restored was made with (``step``;
    default: the newest that verifies), or against config.json where there is no checkpoint
    to restore or it predates checkpoints carrying their settings. Returns the step checked."""
    step = checkpointer.usable_step() if step is None else step
    if cfgs[0].allow_config_change:
        return step
    recorded = checkpointer.recorded_settings(step) if step is not None else None
    for i, (cfg, workdir) in enumerate(zip(cfgs, workdirs)):
        path = os.path.join(workdir, "config.json")
        if recorded is not None and i < len(recorded):
            settings = recorded[i]
        elif os.path.isfile(path):
            with open(path) as f:
                settings = json.load(f)["config"]
        elif step is not None:
            raise ValueError(f"--resume: checkpoint {step} in {checkpointer.folder} does not record the "
                             f"settings it was made with, and {path} is missing; pass "
                             "--allow_config_change to resume with these flags anyway")
        else:
            continue  # nothing to resume: the run starts afresh
        _compare(_flatten(settings), _flatten(json.loads(json.dumps(cfg.record()))), workdir)
    return step


def _compare(recorded: dict, current: dict, workdir: str) -> None:
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


def _write_config_record(exp: experiment.Experiment, run: experiment.Run, workdir: str) -> None:
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
        "config": run.cfg.record(), "versions": versions, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "strategy": exp.strategy,
        "client_chunk_size": exp.engine_config.client_chunk_size,
        "client_grad": exp.engine_config.client_grad,
        "collected_messages_per_round": exp.engine_config.collect, "runs_in_program": len(exp.runs),
        "processes": jax.process_count(),
    })
