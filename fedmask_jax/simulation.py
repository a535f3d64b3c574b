"""A whole federated run: validate the config, load and split data, run rounds, write results.

Data flows one way: dataset -> partition -> ClientData on the device -> jitted rounds ->
metrics -> sinks (console, metrics.jsonl, summary.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedmask_jax import coding, engine, masking, models, outputs, plots
from fedmask_jax import export as export_lib
from fedmask_jax.algorithms import fedavg as fedavg_lib
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.algorithms import registry
from fedmask_jax.data import DATASETS, SPLITS, holdout_validation, load_dataset, partition

ALGORITHMS = tuple(registry.METHODS)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; the absl flags of ``experiments.run`` map onto it."""

    dataset: str = "fashion_mnist"
    model: str = "mlp"
    width: float = 1.0
    mlp_hidden: tuple[int, ...] = (300, 100)
    algorithm: str = "fedpm"
    num_clients: int = 10
    clients_per_round: int = 10
    rounds: int = 10
    local_epochs: int = 3
    batch_size: int = 128
    client_lr: float = 0.1
    client_optimizer: str = "auto"  # auto (adam for mask methods, sgd for dense) | sgd | sgdm | adam
    client_momentum: float = 0.9  # for sgdm
    server_optimizer: str = "sgd"  # dense methods: optax optimizer on -(aggregated update)
    server_lr: float = 0.0  # 0 = the method's default (1 = plain FedAvg)
    server_momentum: float = 0.9  # for sgdm
    topk_fraction: float = 0.01
    qsgd_levels: int = 8
    qsgd_bucket: int = 512
    drive_chunk: int = 4096
    validation_fraction: float = 0.0  # > 0: evaluate on this held-out part of the training set
    split: str = "iid"
    classes_per_client: int = 2
    dirichlet_alpha: float = 0.5
    max_examples_per_client: int = 0  # 0 = no cap
    seed: int = 0
    workdir: str = "runs/default"
    eval_every: int = 1
    eval_batch_size: int = 128
    prior_reset_period: int = 1
    lambda0: float = 1.0
    epsilon: float = 0.01
    weight_init: str = "signed_constant"
    mask_gradient: str = "reference"
    persistent_client_optimizer: bool = False
    client_chunk_size: int = 0  # 0 = chosen per backend
    strategy: str = "auto"  # auto | scan | host_loop
    cpu_ynn_fusions: bool = False  # keep XLA:CPU's YNNPACK fusions (engine.compiler_options)
    num_devices: int = 0  # devices on the clients mesh axis (0 = all local devices)
    coded_uplink: bool = True  # range-code every uplink mask on the host; aggregate the decoded
    downlink: str = "float32"  # float32 | quantized | sampled_mask
    downlink_bits: int = 4
    export_mask: str = "auto"  # auto | sampled | thresholded | none: the final model file
    tensorboard: bool = True  # scalars in <workdir>/tensorboard (tensorboardX, no TensorFlow)
    checkpoint_every: int = 0  # save a checkpoint every N rounds (0 = never)
    resume: bool = False  # continue the run in workdir from its latest checkpoint
    allow_config_change: bool = False  # resume even if the flags differ from the recorded ones
    data_dir: str | None = None
    archive_dir: str | None = None
    download: bool = True
    verbose: bool = True


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: RunConfig) -> None:
    """Rejects a bad config before any data is read or anything is compiled."""
    _check(cfg.dataset in DATASETS, f"--dataset={cfg.dataset!r} is unknown; allowed: {', '.join(DATASETS)}")
    _check(cfg.model in models.MODELS, f"--model={cfg.model!r} is unknown; allowed: {', '.join(models.MODELS)}")
    _check(cfg.algorithm in ALGORITHMS, f"--algorithm={cfg.algorithm!r} is unknown; allowed: {', '.join(ALGORITHMS)}")
    _check(cfg.split in SPLITS, f"--split={cfg.split!r} is unknown; allowed: {', '.join(SPLITS)}")
    _check(cfg.weight_init in models.WEIGHT_INITS,
           f"--weight_init={cfg.weight_init!r} is unknown; allowed: {', '.join(models.WEIGHT_INITS)}")
    _check(cfg.mask_gradient in masking.GRADIENTS,
           f"--mask_gradient={cfg.mask_gradient!r} is unknown; allowed: {', '.join(masking.GRADIENTS)}")
    _check(cfg.num_clients >= 1, f"--num_clients must be >= 1, got {cfg.num_clients}")
    _check(1 <= cfg.clients_per_round <= cfg.num_clients,
           f"--clients_per_round must be between 1 and --num_clients={cfg.num_clients}, "
           f"got {cfg.clients_per_round}")
    _check(cfg.rounds >= 1, f"--rounds must be >= 1, got {cfg.rounds}")
    _check(cfg.local_epochs >= 1, f"--local_epochs must be >= 1, got {cfg.local_epochs}")
    _check(cfg.batch_size >= 1, f"--batch_size must be >= 1, got {cfg.batch_size}")
    _check(cfg.eval_every >= 1, f"--eval_every must be >= 1, got {cfg.eval_every}")
    _check(cfg.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    _check(cfg.width > 0, f"--width must be > 0, got {cfg.width}")
    _check(all(h >= 1 for h in cfg.mlp_hidden), f"--mlp_hidden must be positive, got {cfg.mlp_hidden}")
    _check(cfg.dirichlet_alpha > 0, f"--dirichlet_alpha must be > 0, got {cfg.dirichlet_alpha}")
    _check(cfg.classes_per_client >= 1, f"--classes_per_client must be >= 1, got {cfg.classes_per_client}")
    _check(cfg.max_examples_per_client >= 0,
           f"--max_examples_per_client must be >= 0 (0 = no cap), got {cfg.max_examples_per_client}")
    _check(cfg.strategy in ("auto", *engine.STRATEGIES),
           f"--strategy={cfg.strategy!r} is unknown; allowed: auto, {', '.join(engine.STRATEGIES)}")
    _check(cfg.export_mask in EXPORT_MASKS,
           f"--export_mask={cfg.export_mask!r} is unknown; allowed: {', '.join(EXPORT_MASKS)}")
    _check(0.0 <= cfg.validation_fraction < 1.0,
           f"--validation_fraction must be in [0, 1) (0 = evaluate on the test set), got {cfg.validation_fraction}")
    _check(cfg.checkpoint_every >= 0, f"--checkpoint_every must be >= 0 (0 = never), got {cfg.checkpoint_every}")
    _check(cfg.num_devices >= 0, f"--num_devices must be >= 0 (0 = all), got {cfg.num_devices}")
    _check(cfg.client_chunk_size >= 0, f"--client_chunk_size must be >= 0 (0 = auto), got {cfg.client_chunk_size}")
    _check(cfg.server_lr >= 0, f"--server_lr must be > 0 (0 = the method's default), got {cfg.server_lr}")
    _check(cfg.client_optimizer in ("auto", *fedavg_lib.OPTIMIZERS),
           f"--client_optimizer={cfg.client_optimizer!r} is unknown; allowed: auto, {', '.join(fedavg_lib.OPTIMIZERS)}")
    if registry.is_mask_method(cfg.algorithm):
        _check(cfg.client_optimizer in ("auto", "adam"),
               f"--client_optimizer={cfg.client_optimizer!r}: {cfg.algorithm} trains its scores "
               "with Adam (the reference); use auto or adam")
        _fedpm_config(cfg)  # raises on bad epsilon / lambda0 / reset period / lr
    else:
        _fedavg_config(cfg)  # raises on bad optimizers / learning rates / momenta
        # Builds a throwaway compressor (sizes do not matter) so bad settings raise here.
        registry.compressor_for(cfg.algorithm, 2, [1, 1], _compression_config(cfg))
        _check(cfg.downlink == "float32",
               f"--downlink={cfg.downlink!r} applies to mask methods; {cfg.algorithm} broadcasts float32 weights")


EXPORT_MASKS = ("auto", "sampled", "thresholded", "none")


def _fedavg_config(cfg: RunConfig) -> fedavg_lib.FedAvgConfig:
    return fedavg_lib.FedAvgConfig(
        client_optimizer="sgd" if cfg.client_optimizer == "auto" else cfg.client_optimizer,
        client_lr=cfg.client_lr, client_momentum=cfg.client_momentum,
        server_optimizer=cfg.server_optimizer,
        server_lr=cfg.server_lr or registry.default_server_lr(cfg.algorithm),
        server_momentum=cfg.server_momentum)


def _compression_config(cfg: RunConfig) -> registry.CompressionConfig:
    return registry.CompressionConfig(topk_fraction=cfg.topk_fraction, qsgd_levels=cfg.qsgd_levels,
                                      qsgd_bucket=cfg.qsgd_bucket, drive_chunk=cfg.drive_chunk)


def _fedpm_config(cfg: RunConfig) -> fedpm_lib.FedPMConfig:
    return fedpm_lib.FedPMConfig(
        client_lr=cfg.client_lr, epsilon=cfg.epsilon, lambda0=cfg.lambda0,
        prior_reset_period=cfg.prior_reset_period,
        persistent_optimizer=cfg.persistent_client_optimizer, downlink=cfg.downlink,
        downlink_bits=cfg.downlink_bits,
    )


def _validate_partition(cfg: RunConfig, parts: Sequence[np.ndarray]) -> None:
    sizes = np.array([len(p) for p in parts])
    _check(sizes.min() >= 1,
           f"{int((sizes == 0).sum())} of --num_clients={cfg.num_clients} clients got no data "
           f"under --split={cfg.split}; lower --num_clients or change the split")
    _check(cfg.batch_size <= sizes.max(),
           f"--batch_size={cfg.batch_size} is larger than every client's data (largest client: "
           f"{sizes.max()} examples); lower --batch_size or give clients more data")


class Simulation:
    """Builds everything a run needs; ``run()`` executes it and writes the outputs."""

    def __init__(self, cfg: RunConfig):
        validate(cfg)
        self.cfg = cfg
        self.workdir = outputs.ensure_writable_dir(cfg.workdir)
        archive_dirs = [cfg.archive_dir] if cfg.archive_dir else []
        self.dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir,
                                    archive_dirs=archive_dirs, download=cfg.download)
        if cfg.validation_fraction > 0:  # tuning: evaluate on held-out training data
            self.dataset = holdout_validation(self.dataset, cfg.validation_fraction, cfg.seed)
        self.partition = partition(
            self.dataset.y_train, cfg.num_clients, cfg.split, seed=cfg.seed,
            classes_per_client=cfg.classes_per_client, dirichlet_alpha=cfg.dirichlet_alpha,
            max_examples_per_client=cfg.max_examples_per_client or None)
        _validate_partition(cfg, self.partition)

        self.masked = registry.is_mask_method(cfg.algorithm)
        self.model = models.build_model(
            cfg.model, self.dataset.num_classes, width=cfg.width, mlp_hidden=cfg.mlp_hidden,
            masked=self.masked, weight_init=cfg.weight_init, mask_gradient=cfg.mask_gradient)
        sample_x = jnp.zeros((1, *self.dataset.input_shape), jnp.uint8)
        self.fedpm_config = _fedpm_config(cfg)
        self.algorithm = registry.build(
            cfg.algorithm, self.model, sample_x, fedpm_config=self.fedpm_config,
            fedavg_config=_fedavg_config(cfg), compression=_compression_config(cfg))

        chunk = cfg.client_chunk_size or engine.auto_chunk_size(
            cfg.clients_per_round, self.algorithm.num_params, conv=models.is_conv(cfg.model),
            backend=jax.default_backend())
        self.strategy = cfg.strategy if cfg.strategy != "auto" else engine.auto_strategy(
            conv=models.is_conv(cfg.model), backend=jax.default_backend())
        self.engine_config = engine.EngineConfig(cfg.batch_size, cfg.local_epochs, chunk,
                                                 cpu_ynn_fusions=cfg.cpu_ynn_fusions)
        options = engine.compiler_options(self.engine_config)
        # The host loop drives one device; the scanned round shards clients over the mesh.
        self.mesh = engine.clients_mesh(cfg.num_devices if self.strategy == "scan" else 1)
        # Real bitstreams exist for the binary-mask messages (coding.py); other methods' sizes
        # are counted from their messages by their compressors.
        self.coded_uplink = cfg.coded_uplink and self.algorithm.uplink_payload is not None
        self.round_fn = engine.make_round_fn(self.algorithm, self.engine_config, self.strategy,
                                             self.mesh, collect_uplink=self.coded_uplink)
        self.server_update = jax.jit(self.algorithm.server_update, donate_argnums=(0,),
                                     compiler_options=options)
        self.eval_fn = engine.make_eval_fn(self.algorithm, cfg.eval_batch_size, options)

        self.data = engine.client_data_from_partition(
            self.dataset.x_train, self.dataset.y_train, self.partition)
        self.x_test = jnp.asarray(self.dataset.x_test)
        self.y_test = jnp.asarray(self.dataset.y_test, jnp.int32)
        root = jax.random.key(cfg.seed)
        self._round_root = jax.random.fold_in(root, 1)
        self._eval_root = jax.random.fold_in(root, 2)
        self.server = self.algorithm.server_init(fedpm_lib.server_key(cfg.seed))
        self.export_mask = ("thresholded" if cfg.algorithm == "fedmask" else "sampled") \
            if cfg.export_mask == "auto" else cfg.export_mask
        self.store = engine.init_store(self.algorithm, cfg.num_clients)
        if self.mesh.size > 1:  # the compiled round expects exactly these placements
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self.server, self.store, self.data = jax.device_put(
                (self.server, self.store, self.data), replicated)
            self._cohort_sharding = NamedSharding(self.mesh, PartitionSpec(engine.CLIENTS_AXIS))

    def _cohort(self, r: int):
        cohort = engine.sample_cohort(self.cfg.seed, r, self.cfg.num_clients, self.cfg.clients_per_round)
        ids, valid = engine.pad_cohort(cohort, self.engine_config.client_chunk_size * self.mesh.size)
        if self.mesh.size > 1:
            return jax.device_put((ids, valid), self._cohort_sharding)
        return jnp.asarray(ids), jnp.asarray(valid)

    def compile(self) -> float:
        """Compiles the round and evaluation ahead of time; returns the seconds it took."""
        t0 = time.perf_counter()
        ids, valid = self._cohort(0)
        key = jax.random.fold_in(self._round_root, 0)
        self.round_fn.compile(self.server, self.store, self.data, ids, valid, key)
        self._eval = self.eval_fn.lower(self.server, self.x_test, self.y_test, key).compile()
        return time.perf_counter() - t0

    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        compile_s = self.compile()
        if cfg.verbose:
            print(f"fedmask_jax: {cfg.algorithm} {cfg.model} on {cfg.dataset} "
                  f"({self.algorithm.num_params:,} {'mask entries' if self.masked else 'parameters'}), {cfg.clients_per_round} of "
                  f"{cfg.num_clients} clients/round, {self.strategy} strategy, chunk {self.engine_config.client_chunk_size}, "
                  f"{self.mesh.size} device(s), "
                  f"backend {jax.default_backend()}; compiled in {compile_s:.1f}s", flush=True)
        host = {"round_times": [], "bpps": [], "last_eval": {}, "history": {},
                "cumulative": {"cumulative_uplink_bits": 0.0, "cumulative_uplink_bits_coded": 0.0}}
        start = 0
        if cfg.resume:
            start, host = self.restore(host)
        elif os.path.isdir(self._checkpoint_dir):
            shutil.rmtree(self._checkpoint_dir)  # a fresh run replaces an old one's checkpoints
        self.write_config_record()
        log = outputs.MetricsLog(os.path.join(self.workdir, "metrics.jsonl"), keep_until=start)
        board = outputs.TensorBoardLog(os.path.join(self.workdir, "tensorboard"), start) \
            if cfg.tensorboard else None
        round_times, bpps, history, cumulative = (host[k] for k in ("round_times", "bpps", "history", "cumulative"))
        last_eval = host["last_eval"]
        for r in range(start, cfg.rounds):
            ids, valid = self._cohort(r)
            t0 = time.perf_counter()
            broadcast = fedpm_lib.flat(fedpm_lib.theta(self.server)) if self.masked else None
            out = self.round_fn(self.server, self.store, self.data, ids, valid,
                                jax.random.fold_in(self._round_root, r))
            self.server, self.store, metrics = out[:3]
            metrics = jax.device_get(metrics)
            record = {}
            if self.coded_uplink:
                coded = self._code_and_aggregate(np.asarray(out[3]), broadcast)
                record.update(coded)
            round_time = time.perf_counter() - t0
            round_times.append(round_time)
            bpp = float(metrics["uplink_bits"]) / self.algorithm.num_params
            bpps.append(bpp)
            record.update({name: float(value) for name, value in metrics.items()
                           if name not in ("uplink_bits", "num_examples")})
            record.update({"round": r + 1, "algorithm": cfg.algorithm, "round_time_s": round_time,
                           "uplink_bpp": bpp,
                           "downlink_bpp": fedpm_lib.downlink_bits_per_param(self.fedpm_config, broadcast)
                           if self.masked else 32.0})
            # Whole-cohort uplink so far: the reference's ideal size, and the sent (theta_g) code.
            cohort_entries = self.algorithm.num_params * cfg.clients_per_round
            cumulative["cumulative_uplink_bits"] += bpp * cohort_entries
            record["cumulative_uplink_bits"] = cumulative["cumulative_uplink_bits"]
            if "uplink_bpp_coded_prior" in record:
                cumulative["cumulative_uplink_bits_coded"] += record["uplink_bpp_coded_prior"] * cohort_entries
                record["cumulative_uplink_bits_coded"] = cumulative["cumulative_uplink_bits_coded"]
            for key in ("uplink_bpp_coded_global", "uplink_bpp_coded_prior", "downlink_bpp"):
                if key in record:
                    history.setdefault(key, []).append(record[key])
            # A client whose training blew up makes the aggregate non-finite: evaluate and stop.
            diverged = not math.isfinite(record["train_loss"])
            if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds or diverged:
                t_eval = time.perf_counter()
                ev = jax.device_get(self._eval(self.server, self.x_test, self.y_test,
                                               jax.random.fold_in(self._eval_root, r)))
                last_eval = {k: float(v) for k, v in ev.items()}
                host["last_eval"] = last_eval
                record.update(last_eval, eval_time_s=time.perf_counter() - t_eval,
                              elapsed_s=time.perf_counter() - t_start)
                log.write(record)
                diverged = diverged or not math.isfinite(last_eval["test_loss"])
            if board:
                board.write(record)
            if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.rounds):
                self.save_checkpoint(r + 1, host)
            if cfg.verbose:
                eta = statistics.median(round_times) * (cfg.rounds - r - 1)
                outputs.progress_line(record, cfg.rounds, eta)
            if diverged:
                host["diverged_at_round"] = r + 1
                print(f"warning: {cfg.algorithm} diverged at round {r + 1} (non-finite loss); "
                      "stopping the run. Lower the learning rates (--client_lr, --server_lr).",
                      file=sys.stderr, flush=True)
                break
        log.close()
        if board:
            board.close()

        summary = {
            **{f"final_{k}": v for k, v in last_eval.items()},
            "eval_split": "validation" if cfg.validation_fraction > 0 else "test",
            "mean_uplink_bpp": float(np.mean(bpps)),
            "total_uplink_bits": cumulative["cumulative_uplink_bits"],
            **{f"mean_{k}": float(np.mean(v)) for k, v in history.items()},
            **(self.final_model_bpp() if self.masked else {}),
            **(self.export() if self.masked else {}),
            "rounds": cfg.rounds,
            "rounds_completed": len(round_times) + start,
            "diverged_at_round": host.get("diverged_at_round"),
            "clients_per_round": cfg.clients_per_round,
            "num_clients": cfg.num_clients,
            "dataset": cfg.dataset,
            "model": cfg.model,
            "algorithm": cfg.algorithm,
            "num_params": self.algorithm.num_params,
            "seed": cfg.seed,
            "client_chunk_size": self.engine_config.client_chunk_size,
            "strategy": self.strategy,
            "num_devices": self.mesh.size,
            "backend": jax.default_backend(),
            "compile_time_s": compile_s,
            "first_round_time_s": round_times[0],
            "steady_round_time_s": statistics.median(round_times[1:] or round_times),
            "total_time_s": time.perf_counter() - t_start,
            "config": dataclasses.asdict(cfg),
        }
        summary["plots"] = plots.plot_runs([self.workdir], self.workdir)
        outputs.write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)
        if cfg.verbose:
            print(f"done: {cfg.algorithm} test accuracy {summary['final_test_accuracy']:.4f}"
                  + (f" (thresholded {summary['final_test_accuracy_thresholded']:.4f})"
                     if "final_test_accuracy_thresholded" in summary else "")
                  + f", mean uplink {summary['mean_uplink_bpp']:.4f} bpp"
                  + (f", final model {summary['final_model_bpp']:.4f} bpp"
                     if "final_model_bpp" in summary else "")
                  + (f" (file {summary['final_model_file_bpp']:.4f} bpp)" if "final_model_file_bpp" in summary else "")
                  + (f", coded uplink {summary['mean_uplink_bpp_coded_global']:.4f} bpp global / "
                     f"{summary['mean_uplink_bpp_coded_prior']:.4f} bpp with theta_g"
                     if "mean_uplink_bpp_coded_prior" in summary else "")
                  + f"; {summary['total_time_s']:.1f}s total, "
                  f"{summary['steady_round_time_s']:.2f}s/round; results in {self.workdir}",
                  flush=True)
        return summary

    @property
    def _checkpoint_dir(self) -> str:
        return os.path.join(self.workdir, "checkpoints")

    def _checkpoint_manager(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(
            self._checkpoint_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    def _device_state(self):
        # Typed PRNG keys are stored as their raw key data.
        server = self.server._replace(key=jax.random.key_data(self.server.key))
        return {"server": server, "store": self.store}

    def save_checkpoint(self, rounds_done: int, host: dict) -> None:
        """Server state, client store and host-side history after ``rounds_done`` rounds.

        orbax writes into a temporary folder and renames it when complete, so a kill at any
        moment leaves the previous checkpoint intact.
        """
        import orbax.checkpoint as ocp

        with self._checkpoint_manager() as mngr:
            mngr.save(rounds_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(self._device_state()), host=ocp.args.JsonSave(host)))
            mngr.wait_until_finished()

    def restore(self, host: dict) -> tuple[int, dict]:
        """Loads the latest checkpoint of this workdir; returns (rounds done, host history)."""
        import orbax.checkpoint as ocp

        self._check_same_config()
        with self._checkpoint_manager() as mngr:
            step = mngr.latest_step()
            if step is None:
                if self.cfg.verbose:
                    print(f"resume: no checkpoint in {self._checkpoint_dir}; starting afresh", flush=True)
                return 0, host
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(self._device_state()), host=ocp.args.JsonRestore()))
        state = restored.state
        self.server = state["server"]._replace(key=jax.random.wrap_key_data(state["server"].key))
        self.store = state["store"]
        if self.cfg.verbose:
            print(f"resume: continuing after round {step} from {self._checkpoint_dir}", flush=True)
        return int(step), dict(restored.host)

    _RESUME_FLAGS = ("resume", "allow_config_change", "verbose", "checkpoint_every")

    def _check_same_config(self) -> None:
        path = os.path.join(self.workdir, "config.json")
        if not os.path.isfile(path) or self.cfg.allow_config_change:
            return
        with open(path) as f:
            recorded = json.load(f)["config"]
        current = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        differ = sorted(k for k in set(recorded) | set(current)
                        if k not in self._RESUME_FLAGS and recorded.get(k) != current.get(k))
        if differ:
            raise ValueError(
                f"--resume: {self.workdir} was run with different flags: "
                + ", ".join(f"--{k} was {recorded.get(k)!r}, now {current.get(k)!r}" for k in differ)
                + "; pass --allow_config_change to resume anyway, or use another --workdir")

    def write_config_record(self) -> None:
        """<workdir>/config.json: every resolved setting and the package versions."""
        from importlib import metadata

        versions = {}
        for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "tensorflow-datasets",
                    "constriction", "fedmask_jax"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        outputs.write_json_atomic(os.path.join(self.workdir, "config.json"), {
            "config": dataclasses.asdict(self.cfg), "versions": versions,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "strategy": self.strategy, "client_chunk_size": self.engine_config.client_chunk_size,
        })

    def _code_and_aggregate(self, payloads: np.ndarray, broadcast: np.ndarray) -> dict:
        """Codes each real client's mask twice, decodes the sent (prior-coded) stream, checks
        it, and applies the server update to the sum of the decoded masks."""
        t0 = time.perf_counter()
        n, k = self.algorithm.num_params, self.cfg.clients_per_round
        counts = np.zeros(n, np.float32)
        global_bits, prior_bits = [], []
        # pad_cohort puts the real clients first; the rest are padding.
        for row in payloads[:k]:
            mask = np.unpackbits(row)[:n]
            _, words_global = coding.encode_global(mask)
            words_prior = coding.encode(mask, broadcast)
            decoded = coding.decode(words_prior, broadcast, n)
            if not np.array_equal(decoded, mask):
                raise RuntimeError("uplink mask did not survive range coding")
            counts += decoded
            global_bits.append(coding.global_bits(words_global))
            prior_bits.append(coding.prior_bits(words_prior))
        counts_tree = fedpm_lib.unflat(counts, self.server.scores)
        self.server = self.server_update(self.server, counts_tree, jnp.float32(k))
        return {"uplink_bpp_coded_global": float(np.mean(global_bits)) / n,
                "uplink_bpp_coded_prior": float(np.mean(prior_bits)) / n,
                "coding_time_s": time.perf_counter() - t0}

    def export(self) -> dict:
        """Writes <workdir>/model.fmjx (seed + architecture + coded mask) unless disabled."""
        if self.export_mask == "none":
            return {}
        theta = fedpm_lib.flat(fedpm_lib.theta(self.server))
        if self.export_mask == "thresholded":
            mask = (theta > 0.5).astype(np.uint8)
        else:
            key = jax.random.fold_in(jax.random.key(self.cfg.seed), 4)
            mask = np.asarray(jax.random.bernoulli(key, jnp.asarray(theta))).astype(np.uint8)
        cfg = self.cfg
        architecture = {"name": cfg.model, "num_classes": self.dataset.num_classes,
                        "width": cfg.width, "mlp_hidden": list(cfg.mlp_hidden),
                        "weight_init": cfg.weight_init, "mask_gradient": cfg.mask_gradient}
        path = os.path.join(self.workdir, "model.fmjx")
        size = export_lib.export_model(path, architecture=architecture,
                                       input_shape=self.dataset.input_shape, seed=cfg.seed,
                                       mask_flat=mask, mask_kind=self.export_mask)
        return {"final_model_file": path, "final_model_file_bytes": size,
                "final_model_file_bpp": 8.0 * size / self.algorithm.num_params}

    def final_model_bpp(self) -> dict:
        """Ideal size of the final model's mask (seed + one binary mask), in bits per entry."""
        n = self.algorithm.num_params
        theta = jax.tree.leaves(fedpm_lib.theta(self.server))
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), 3)
        sampled = sum(float(jnp.sum(jax.random.bernoulli(jax.random.fold_in(key, i), t)))
                      for i, t in enumerate(theta))
        thresholded = sum(float(jnp.sum(t > 0.5)) for t in theta)
        bits = lambda ones: float(masking.mask_bits(jnp.float32(ones), n)) / n  # noqa: E731
        return {"final_model_bpp": bits(sampled), "final_model_bpp_thresholded": bits(thresholded)}


def run(cfg: RunConfig) -> dict:
    """Runs ``cfg`` end to end and returns the summary (also written to the workdir)."""
    return Simulation(cfg).run()
