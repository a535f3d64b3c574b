"""Build: a ``RunConfig`` becomes everything a run needs, and nothing is written anywhere.

``build(cfg)`` loads and splits the data, builds the model and the method, chooses the
execution strategy and client chunk, makes the round and evaluation functions and the
method's host hooks. ``experiments.run`` (through ``simulation.run``), the benchmark and the
sweep all start from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedmask_jax import engine, keys, models
from fedmask_jax.algorithms import registry
from fedmask_jax.algorithms.base import FederatedAlgorithm, HostContext, HostHook, MethodSpec, PyTree
from fedmask_jax.data import Dataset, holdout_validation, load_dataset, partition
from fedmask_jax.run_config import RunConfig

@dataclasses.dataclass
class Experiment:
    cfg: RunConfig
    spec: MethodSpec
    method_config: Any
    dataset: Dataset
    partition: list[np.ndarray]
    architecture: models.Architecture
    algorithm: FederatedAlgorithm
    engine_config: engine.EngineConfig
    strategy: str
    mesh: Mesh
    round_fn: engine.RoundFn
    eval_fn: Any
    data: engine.ClientData
    x_test: jax.Array
    y_test: jax.Array
    hooks: Sequence[HostHook]

    def initial_state(self) -> tuple[PyTree, PyTree]:
        """(server state, every client's persistent state) before round 1."""
        server = self.algorithm.server_init(keys.server_key(self.cfg.seed))
        store = engine.init_store(self.algorithm, self.cfg.num_clients)
        if self.mesh.size > 1:  # the compiled round expects exactly these placements
            server, store = jax.device_put((server, store), NamedSharding(self.mesh, PartitionSpec()))
        return server, store

    def cohort(self, round_index: int) -> engine.Cohort:
        cfg = self.cfg
        clients = engine.sample_cohort(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round)
        cohort = engine.make_cohort(clients, self.engine_config.client_chunk_size * self.round_fn.devices,
                                    self.engine_config.collect, cfg.seed, round_index)
        if self.round_fn.devices > 1:
            return jax.device_put(cohort, NamedSharding(self.mesh, PartitionSpec(engine.CLIENTS_AXIS)))
        return cohort

    def round_key(self, round_index: int) -> jax.Array:
        return keys.round_key(self.cfg.seed, round_index)

    def eval_key(self, round_index: int) -> jax.Array:
        return keys.eval_key(self.cfg.seed, round_index)

    def compile(self, server, store) -> float:
        """Compiles the round and the evaluation ahead of time; returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        self.round_fn.compile(server, store, self.data, self.cohort(0), self.round_key(0))
        self.eval_fn = self.eval_fn.lower(server, self.x_test, self.y_test, self.eval_key(0)).compile()
        return time.perf_counter() - t0

    def evaluate(self, server, round_index: int) -> dict[str, float]:
        out = jax.device_get(self.eval_fn(server, self.x_test, self.y_test, self.eval_key(round_index)))
        return {k: float(v) for k, v in out.items()}

    def describe(self) -> str:
        cfg = self.cfg
        what = "mask entries" if self.spec.masked else "parameters"
        return (f"fedmask_jax: {cfg.algorithm} {cfg.model} on {cfg.dataset} "
                f"({self.algorithm.num_params:,} {what}), {cfg.clients_per_round} of {cfg.num_clients} "
                f"clients/round, {self.strategy} strategy, chunk {self.engine_config.client_chunk_size}, "
                f"{self.round_fn.devices} device(s), backend {jax.default_backend()}")

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()


def _check_partition(cfg: RunConfig, parts: Sequence[np.ndarray]) -> None:
    sizes = np.array([len(p) for p in parts])
    if sizes.min() < 1:
        raise ValueError(f"{int((sizes == 0).sum())} of --num_clients={cfg.num_clients} clients got no "
                         f"data under --split={cfg.split}; lower --num_clients or change the split")
    if cfg.batch_size > sizes.max():
        raise ValueError(f"--batch_size={cfg.batch_size} is larger than every client's data (largest "
                         f"client: {sizes.max()} examples); lower --batch_size or give clients more data")


def build(cfg: RunConfig, *, dataset: Dataset | None = None, workdir: str | None = None) -> Experiment:
    """Everything ``cfg`` describes, ready to run. ``dataset``: use this one instead of
    loading ``cfg.dataset``; ``workdir``: where the method's hooks may write files (None:
    nowhere)."""
    if dataset is None:
        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir,
                               archive_dirs=[cfg.archive_dir] if cfg.archive_dir else [],
                               download=cfg.download)
    if cfg.split == "noniid" and cfg.classes_per_client > dataset.num_classes:
        raise ValueError(f"--classes_per_client={cfg.classes_per_client} is more than the "
                         f"{dataset.num_classes} classes of --dataset={cfg.dataset}; choose at most "
                         f"{dataset.num_classes}")
    if cfg.validation_fraction > 0:  # tuning: evaluate on held-out training data
        dataset = holdout_validation(dataset, cfg.validation_fraction, cfg.seed)
    parts = partition(dataset.y_train, cfg.num_clients, cfg.split, seed=cfg.seed,
                      classes_per_client=cfg.classes_per_client, dirichlet_alpha=cfg.dirichlet_alpha,
                      max_examples_per_client=cfg.max_examples_per_client or None)
    _check_partition(cfg, parts)

    spec, method_config = registry.spec(cfg.algorithm), cfg.method_config
    arch = models.Architecture(cfg.model, dataset.num_classes, dataset.input_shape, cfg.width,
                               tuple(cfg.mlp_hidden))
    algorithm = spec.build(arch, method_config)
    hooks = list(spec.host_hooks(HostContext(algorithm, method_config, arch, cfg.seed,
                                             cfg.clients_per_round, workdir, cfg.verbose)))

    backend = jax.default_backend()
    strategy = cfg.strategy if cfg.strategy != "auto" else engine.auto_strategy(conv=arch.conv, backend=backend)
    chunk = cfg.client_chunk_size or engine.auto_chunk_size(
        cfg.clients_per_round, algorithm.num_params, conv=arch.conv, backend=backend)
    engine_config = engine.EngineConfig(cfg.batch_size, cfg.local_epochs, chunk,
                                        cpu_ynn_fusions=cfg.cpu_ynn_fusions,
                                        collect=max([h.collect for h in hooks], default=0))
    # The host loop drives one device; the scanned round shards clients over the mesh.
    mesh = engine.clients_mesh(cfg.num_devices if strategy == "scan" else 1)
    round_fn = engine.make_round_fn(algorithm, engine_config, strategy, mesh)
    eval_fn = engine.make_eval_fn(algorithm, cfg.eval_batch_size, engine.compiler_options(engine_config))
    data = engine.client_data_from_partition(dataset.x_train, dataset.y_train, parts)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test, jnp.int32)
    if mesh.size > 1:
        data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
    return Experiment(cfg, spec, method_config, dataset, parts, arch, algorithm, engine_config,
                      strategy, mesh, round_fn, eval_fn, data, x_test, y_test, hooks)
