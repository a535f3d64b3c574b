"""The round engine: one round trains a whole cohort and aggregates it.

This module is the engine's public surface: what the rest of ``fedmask_jax`` (build, the run
settings) and ``experiments/`` use, and nothing else (the modules below hold the rest, like
optax's public ``__init__`` over ``_src``). One concern per module:

* ``program`` -- the round program: its orchestration written once over client stages, run by
  an injected loop (one jitted program, or Python over jitted stages); ``RoundFn``,
  ``make_round_fn``, ``RoundOutput``, ``Collected``;
* ``config`` -- what a program is compiled with: ``EngineConfig``, ``STRATEGIES``,
  ``CLIENT_GRADS``, ``compiler_options``;
* ``data`` -- what the round reads and keeps per client: ``ClientData``,
  ``client_data_from_partition``, ``check_client_data``, ``init_store``;
* ``cohort`` -- one round's clients as the program takes them: ``Cohort``, ``make_cohort``
  (who takes part, and with what step budget, is the federation's: ``federation.sample_cohort``
  and ``federation.ALL_STEPS``, named here too);
* ``placement`` -- device meshes: ``clients_mesh``, ``runs_mesh``, ``CLIENTS_AXIS``,
  ``RUNS_AXIS``;
* ``evaluation`` -- ``make_eval_fn``;
* ``plan`` -- sizing: ``plan_execution`` decides once how runs execute here
  (``ExecutionPlan``: strategy, client chunk, client gradient, runs vectorized, runs per
  program) from the ``auto_*`` heuristics it combines (public for what calls one alone);
  ``memory_needed`` and the device's memory say whether a run fits.

The engine knows nothing about masks: everything method-specific is in the
``FederatedAlgorithm`` it is given.
"""

from fedmask_jax.engine.cohort import Cohort, make_cohort
from fedmask_jax.engine.config import CLIENT_GRADS, STRATEGIES, EngineConfig, compiler_options
from fedmask_jax.engine.data import (ClientData, check_client_data, client_data_from_partition, init_contributions,
                                     init_store)
from fedmask_jax.engine.evaluation import make_eval_fn
from fedmask_jax.engine.placement import CLIENTS_AXIS, RUNS_AXIS, clients_mesh, runs_mesh
from fedmask_jax.engine.plan import (ExecutionPlan, ExecutionSettings, auto_chunk_size, auto_client_grad,
                                     auto_runs_per_program, auto_runs_vectorized, auto_strategy,
                                     cpu_cache_bytes, device_memory_bytes, host_memory_bytes,
                                     memory_needed, message_bytes, plan_execution)
from fedmask_jax.engine.program import (ROUND_METRICS, Collected, Contributions, RoundFn, RoundOutput,
                                     make_round_fn)
# Who takes part is the federation's; named here too for the engine's callers.
from fedmask_jax.federation import ALL_STEPS, sample_cohort

__all__ = [
    # the round program
    "RoundFn", "make_round_fn", "RoundOutput", "ROUND_METRICS", "Collected",
    # what it is compiled with
    "EngineConfig", "STRATEGIES", "CLIENT_GRADS", "compiler_options",
    # its inputs
    "ClientData", "client_data_from_partition", "check_client_data", "init_store",
    "Cohort", "make_cohort", "ALL_STEPS", "sample_cohort",
    # where it runs
    "clients_mesh", "runs_mesh", "CLIENTS_AXIS", "RUNS_AXIS",
    # evaluation
    "make_eval_fn",
    # sizing
    "plan_execution", "ExecutionPlan", "ExecutionSettings",
    "auto_strategy", "auto_chunk_size", "auto_client_grad", "auto_runs_per_program",
    "auto_runs_vectorized", "cpu_cache_bytes", "host_memory_bytes", "device_memory_bytes",
    "memory_needed", "message_bytes",
]
