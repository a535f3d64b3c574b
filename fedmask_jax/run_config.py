"""What defines a run: ``RunConfig`` (the run's own settings) plus the chosen method's config.

The run's settings are fields here; each method's hyperparameters are fields of its own
config dataclass (``MethodSpec.config``), given to a run as ``RunConfig.method`` -- only the
ones set explicitly; the rest take the method's defaults. ``define_flags`` and
``config_from_flags`` turn both into absl flags and back, so a flag, its help, its default
and its checks are written once, where the setting lives.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fedmask_jax import config as config_lib
from fedmask_jax import buffered, conv, engine, federation, models
from fedmask_jax.algorithms import registry
from fedmask_jax.config import setting
from fedmask_jax.data import DATASETS, SPLITS

# Settings that do not change what a run computes: a resumed run may differ in them (a workdir
# or data folder that was moved or copied still holds the same run; more rounds continue it).
RESUME_NEUTRAL = ("resume", "allow_config_change", "verbose", "checkpoint_every", "tensorboard", "plots",
                  "workdir", "data_dir", "archive_dir", "download", "rounds")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; ``experiments.run``'s flags map onto it."""

    dataset: str = setting("fashion_mnist", "Dataset.", choices=DATASETS)
    model: str = setting("mlp", "Architecture.", choices=models.MODELS)
    width: float = setting(1.0, "Width multiplier for every layer.", min=0, min_open=True)
    mlp_hidden: tuple[int, ...] = setting((300, 100), "Hidden sizes of the MLP.", min=1)
    algorithm: str = setting("fedpm", "Federated method: " + "; ".join(
        f"{name} = {s.description}" for name, s in registry.METHODS.items()) + ".",
        choices=tuple(registry.METHODS))
    num_clients: int = setting(10, "Population size N.", min=1)
    clients_per_round: int = setting(10, "Cohort size K (<= N), sampled uniformly without "
                                     "replacement, keyed by (seed, round).", min=1)
    rounds: int = setting(10, "Number of rounds.", min=1)
    local_epochs: int = setting(3, "Local epochs per round.", min=1)
    batch_size: int = setting(128, "Local mini-batch size.", min=1)
    validation_fraction: float = setting(
        0.0, "Hold out this fraction of the training set and evaluate on it instead of the test "
        "set (for tuning; 0 = test set).", min=0, max=1, max_open=True)
    split: str = setting("iid", "iid | noniid (reference: consecutive classes) | dirichlet.",
                         choices=SPLITS)
    classes_per_client: int = setting(2, "For --split=noniid.", min=1)
    dirichlet_alpha: float = setting(0.5, "For --split=dirichlet.", min=0, min_open=True)
    max_examples_per_client: int = setting(0, "Cap on each client's examples (0 = no cap).", min=0)
    availability: str = setting("always", "Which clients can be sampled each round: always, "
                                "bernoulli:P, diurnal:PERIOD,LOW,HIGH (a cosine in rounds, a phase per "
                                "client) or csv:PATH (a probability per client).")
    local_work: str = setting("full", "Each client's speed, the share of its full local work done in "
                              "one second of the simulated clock: full (1), a number, uniform:LOW,HIGH, "
                              "lognormal:MU,SIGMA or csv:PATH (a speed per client; drawn once per client).")
    round_deadline: float = setting(1.0, "Seconds of local work a client has: one with speed v finishes "
                                    "its local work if v * deadline >= 1, else it straggles.",
                                    min=0, min_open=True)
    straggler_policy: str = setting("partial", "Stragglers: drop them from the round, or take the "
                                    "partial work they finished by the deadline.",
                                    choices=federation.STRAGGLER_POLICIES)
    uplink_mbps: str = setting("inf", "Each client's uplink in Mbit/s on the simulated clock: inf (no "
                               "limit), a number, uniform:LOW,HIGH, lognormal:MU,SIGMA or csv:PATH.")
    downlink_mbps: str = setting("inf", "Each client's downlink in Mbit/s, as --uplink_mbps.")
    latency_s: str = setting("0", "Each client's latency per round in seconds: a number, "
                             "uniform:LOW,HIGH, lognormal:MU,SIGMA or csv:PATH.")
    aggregation: str = setting("sync", "sync: each round trains --clients_per_round clients and waits for "
                               "all of them; buffered: --concurrency clients in flight at once, the server "
                               "updating whenever --buffer_size of them have finished (FedBuff), on the "
                               "simulated clock.", choices=buffered.AGGREGATIONS)
    concurrency: int = setting(0, "With --aggregation=buffered: clients in flight at once (0 = "
                               "--clients_per_round).", min=0)
    buffer_size: int = setting(0, "With --aggregation=buffered: finished clients per server update (0 = "
                               "--clients_per_round).", min=0)
    staleness: str = setting("constant", "With --aggregation=buffered: a finished client's weight by the "
                             "server versions since its download, tau: constant (1) or poly:A "
                             "(1/(1+tau)^A).")
    seed: int = setting(0, "Seed of frozen weights, partition, cohorts and masks.", min=0)
    workdir: str = setting("runs/default", "Where metrics.jsonl, summary.json and the rest go.")
    eval_every: int = setting(1, "Evaluate every this many rounds (and at the last).", min=1)
    eval_batch_size: int = setting(128, "Test batch size; one fresh mask per test batch.", min=1)
    client_chunk_size: int = setting(0, "Clients trained at once under vmap (0 = chosen per "
                                     "backend).", min=0)
    client_grad: str = setting("auto", "Gradients of a vmapped client chunk: per_client (each "
                               "client's own, vmapped) or summed (the gradient of the chunk's "
                               "summed loss: the same gradients, but a grouped conv's filter "
                               "gradient runs as cuDNN's grouped backward-filter kernel); auto: "
                               "summed for conv models in chunks of several clients on GPU.",
                               choices=("auto", *engine.CLIENT_GRADS))
    runs_vectorized: int = setting(0, "Runs sharing one program (a sweep's batch): how many are "
                                   "vmapped together, the rest following one after another "
                                   "inside the program (0 = chosen per backend).", min=0)
    strategy: str = setting("auto", "Round execution: scan (one program) or host_loop (jitted "
                            "steps driven from Python; fast for convs on XLA:CPU); auto picks "
                            "per backend and model.", choices=("auto", *engine.STRATEGIES))
    cpu_ynn_fusions: bool = setting(False, "On CPU, keep XLA's YNNPACK fusions (jaxlib's default); "
                                    "off because its convolutions are slower here "
                                    "(docs/benchmarks.md).")
    cpu_conv: str = setting("auto", "On CPU, the convolution kernels: onednn (oneDNN's, through "
                            "JAX's FFI; built by scripts/setup.sh) or xla (XLA's own); auto: onednn "
                            "when it is built.", choices=("auto", "onednn", "xla"))
    conv_precision: str = setting("f32", "Convolution operands: f32 (the authors' code; TF32 on "
                                  "GPUs) or bf16 (bfloat16 operands with float32 accumulation, "
                                  "forward and both gradients; a masked conv's kernel goes in as "
                                  "sign * mask, exact in bfloat16, its scale c applied to the float32 "
                                  "output). Dense layers stay float32. On CPU, bf16 convolutions run "
                                  "on XLA's kernels (the oneDNN ones are float32-only), slower "
                                  "there: it is meant for GPUs.", choices=conv.PRECISIONS)
    num_devices: int = setting(0, "Devices on the 'clients' mesh axis (0 = all local devices).", min=0)
    tensorboard: bool = setting(True, "Write TensorBoard scalars to <workdir>/tensorboard.")
    plots: bool = setting(True, "Draw accuracy.png, loss.png and accuracy_vs_uplink.png in <workdir> at the "
                          "end (a sweep of many runs may leave them to experiments.plot, "
                          "which draws them from metrics.jsonl).")
    checkpoint_every: int = setting(0, "Save a checkpoint every N rounds in <workdir>/checkpoints "
                                    "(0 = never).", min=0)
    resume: bool = setting(False, "Continue the run in --workdir from its latest checkpoint.")
    allow_config_change: bool = setting(False, "With --resume: continue even if the settings "
                                        "differ from the workdir's config.json.")
    data_dir: str | None = setting(None, "TFDS data folder (default ~/tensorflow_datasets).")
    archive_dir: str | None = setting(None, "Folder holding the original dataset archives.")
    download: bool = setting(True, "Download missing archives when online.")
    verbose: bool = setting(True, "Print progress.", flag=False)
    # The chosen method's settings that differ from its defaults (flag name -> value).
    method: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        config_lib.check(self)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"--clients_per_round must be between 1 and --num_clients={self.num_clients}, "
                             f"got {self.clients_per_round}")
        federation.network(self, check_only=True)  # a bad bandwidth or latency fails before any data is read
        self._check_aggregation()
        self.method_config  # raises on a setting the method lacks or a bad value

    def _check_aggregation(self) -> None:
        if self.aggregation == "sync":
            given = [f"--{name}={getattr(self, name)}" for name, default in
                     (("concurrency", 0), ("buffer_size", 0), ("staleness", "constant")) if getattr(self, name) != default]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to --aggregation=buffered (this run is sync)")
            return
        buffered.check_staleness(self.staleness)
        c, m = self.slots, self.buffered_clients
        if c > self.num_clients:
            raise ValueError(f"--concurrency={c} is more than the --num_clients={self.num_clients} clients; "
                             f"choose at most {self.num_clients}")
        if m > c:
            raise ValueError(f"--buffer_size={m} is more than the --concurrency={c} clients in flight; "
                             f"choose at most {c}")
        if self.round_deadline != 1.0 or self.straggler_policy != "partial":
            raise ValueError("--round_deadline and --straggler_policy do not apply to --aggregation=buffered "
                             "(a client works until it is done; its speed sets when)")

    @property
    def slots(self) -> int:
        """Clients in flight at once (buffered aggregation)."""
        return self.concurrency or self.clients_per_round

    @property
    def buffered_clients(self) -> int:
        """Finished clients per server update (buffered aggregation)."""
        return self.buffer_size or self.clients_per_round

    @property
    def method_config(self):
        """The chosen method's config: its defaults, overridden by ``method``."""
        return registry.method_config(self.algorithm, **dict(self.method))

    def record(self) -> dict:
        """Every resolved setting, the method's included, as plain JSON values."""
        out = dataclasses.asdict(self)
        out["method"] = dataclasses.asdict(self.method_config)
        return out

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def define_flags(flag_values) -> None:
    """The run's settings and every method's hyperparameters as absl flags."""
    config_lib.define_flags([("run", RunConfig)], flag_values)
    config_lib.define_flags([(name, s.config) for name, s in registry.METHODS.items()], flag_values,
                            per_owner_defaults=True)


def config_from_flags(flag_values) -> RunConfig:
    """The ``RunConfig`` the parsed flags describe. A method flag given explicitly that the
    chosen method does not have is an error (not silently ignored)."""
    run = {f.name: config_lib.from_flag(RunConfig, f.name, flag_values[f.name].value)
           for f in config_lib.flag_fields(RunConfig)}
    spec = registry.spec(run["algorithm"])
    given = {name for name in registry.method_flag_names() - {"algorithm"}
             if flag_values[name].present}
    method = {}
    for name in sorted(given):
        if name not in spec.config.__dataclass_fields__:
            registry.method_config(spec.name, **{name: None})  # raises, naming the owners
        method[name] = config_lib.from_flag(spec.config, name, flag_values[name].value)
    return RunConfig(**run, method=method)
