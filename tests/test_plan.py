"""``engine.plan_execution`` makes the decisions ``experiment.build`` and
``experiments.run_batch`` each worked out on their own before it, and the same ones: the two
computations, copied here as they were, against the plan over a grid of settings and sizes."""

import dataclasses
import itertools

import pytest

from fedmask_jax import engine


@dataclasses.dataclass(frozen=True)
class Settings:
    strategy: str
    client_chunk_size: int
    client_grad: str
    runs_vectorized: int
    clients_per_round: int


def _build_before(cfg, runs, num_params, conv, backend, separable_step):
    """experiment.build's decisions before the plan (strategy, chunk, client_grad, runs
    vectorized); None where it refused the runs."""
    strategy = cfg.strategy if cfg.strategy != "auto" else engine.auto_strategy(conv=conv, backend=backend)
    if runs > 1 and strategy != "scan":
        return None
    chunk = cfg.client_chunk_size or engine.auto_chunk_size(
        cfg.clients_per_round, num_params, conv=conv, backend=backend)
    runs_vectorized = cfg.runs_vectorized or engine.auto_runs_vectorized(runs, num_params, chunk, backend=backend)
    client_grad = cfg.client_grad
    if client_grad == "auto":
        client_grad = engine.auto_client_grad(conv=conv, chunk=chunk, backend=backend)
        if not separable_step:
            client_grad = "per_client"
    return strategy, chunk, client_grad, min(runs_vectorized, runs)


def _run_batch_before(cfg, runs, num_params, conv, backend, requested):
    """experiments.run_batch.runs_per_program before the plan."""
    strategy = cfg.strategy if cfg.strategy != "auto" else engine.auto_strategy(conv=conv, backend=backend)
    if strategy != "scan":
        return 0
    if requested:
        return requested
    chunk = cfg.client_chunk_size or engine.auto_chunk_size(cfg.clients_per_round, num_params,
                                                            conv=conv, backend=backend)
    return engine.auto_runs_per_program(runs, num_params, chunk, backend=backend)


GRID = dict(
    strategy=("auto", "scan", "host_loop"),
    client_chunk_size=(0, 1, 3),
    client_grad=("auto", "per_client", "summed"),
    runs_vectorized=(0, 1, 3),
    clients_per_round=(1, 6, 10, 97),
)
SIZES = dict(runs=(1, 2, 4, 7), num_params=(10, 12_345, 2_000_000, 300_000_000), conv=(False, True),
             backend=("cpu", "gpu", "tpu"))


@pytest.mark.parametrize("backend", SIZES["backend"])
def test_the_plan_decides_as_build_and_run_batch_did(backend):
    compared = 0
    for values in itertools.product(*GRID.values()):
        cfg = Settings(*values)
        for runs, num_params, conv in itertools.product(SIZES["runs"], SIZES["num_params"], SIZES["conv"]):
            for separable_step, requested in itertools.product((True, False), (0, 5)):
                plan = engine.plan_execution(cfg, runs=runs, num_params=num_params, conv=conv, backend=backend,
                                             separable_step=separable_step, max_runs_per_program=requested)
                built = _build_before(cfg, runs, num_params, conv, backend, separable_step)
                if built is not None:  # build refuses the others itself (it reads plan.strategy)
                    assert (plan.strategy, plan.client_chunk_size, plan.client_grad,
                            plan.runs_vectorized) == built, (cfg, runs, num_params, conv, separable_step)
                else:
                    assert runs > 1 and plan.strategy != "scan"
                assert plan.runs_per_program == _run_batch_before(cfg, runs, num_params, conv, backend,
                                                                  requested), (cfg, runs, num_params, conv)
                compared += 1
    assert compared == 3 * 3 * 3 * 3 * 4 * 4 * 4 * 2 * 2 * 2


def test_a_plan_is_a_frozen_value():
    plan = engine.plan_execution(Settings("auto", 0, "auto", 0, 10), runs=1, num_params=1000, conv=False,
                                 backend="gpu")
    assert plan == engine.ExecutionPlan("scan", 10, "per_client", 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.strategy = "host_loop"


@pytest.mark.parametrize("algorithm", ["fedpm", "klms", "fedavg", "topk"])
@pytest.mark.parametrize("model", ["mlp", "conv4"])
def test_run_batch_sizes_a_run_by_the_entries_build_plans_by(algorithm, model):
    """A sweep groups its points by the same size as build plans each program by: the
    method's entries, not a masked model's scores and frozen weights together."""
    from experiments import run_batch
    from fedmask_jax import models
    from fedmask_jax.algorithms import registry
    from fedmask_jax.data import load_dataset
    from fedmask_jax.run_config import RunConfig

    ds = load_dataset("digits")
    cfg = RunConfig(dataset="digits", algorithm=algorithm, model=model, mlp_hidden=(32,), width=0.25)
    arch = models.Architecture(model, ds.num_classes, ds.input_shape, cfg.width, tuple(cfg.mlp_hidden))
    built = registry.spec(algorithm).build(arch, cfg.method_config)
    assert run_batch.method_entries(cfg, ds) == (built.num_params, model == "conv4")
