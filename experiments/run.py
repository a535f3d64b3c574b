"""Runs one federated simulation.

    python -m experiments.run --flagfile=experiments/configs/quickstart.flags

Writes <workdir>/metrics.jsonl (one line per evaluated round) and <workdir>/summary.json.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from fedmask_jax import engine, masking, models
from fedmask_jax.data import DATASETS, SPLITS, DataError
from fedmask_jax.algorithms.fedavg import OPTIMIZERS
from fedmask_jax.algorithms.registry import METHODS
from fedmask_jax.simulation import ALGORITHMS, EXPORT_MASKS, RunConfig, run

_D = RunConfig()
F = flags.FLAGS
flags.DEFINE_enum("dataset", _D.dataset, list(DATASETS), "Dataset.")
flags.DEFINE_enum("model", _D.model, list(models.MODELS), "Architecture (DESIGN section 2).")
flags.DEFINE_float("width", _D.width, "Width multiplier for every layer.")
flags.DEFINE_list("mlp_hidden", [str(h) for h in _D.mlp_hidden], "Hidden sizes of the MLP.")
flags.DEFINE_enum("algorithm", _D.algorithm, list(ALGORITHMS), "Federated method: " + "; ".join(
    f"{name} = {what}" for name, what in METHODS.items()) + ".")
flags.DEFINE_integer("num_clients", _D.num_clients, "Population size N.")
flags.DEFINE_integer("clients_per_round", _D.clients_per_round, "Cohort size K (<= N), sampled uniformly without replacement.")
flags.DEFINE_integer("rounds", _D.rounds, "Number of rounds.")
flags.DEFINE_integer("local_epochs", _D.local_epochs, "Local epochs per round.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Local mini-batch size.")
flags.DEFINE_float("client_lr", _D.client_lr, "Client learning rate (Adam on the scores for mask methods; --client_optimizer for dense ones).")
flags.DEFINE_enum("client_optimizer", _D.client_optimizer, ["auto", *OPTIMIZERS], "Client optimizer: auto = adam for mask methods (reference), sgd for dense methods.")
flags.DEFINE_float("client_momentum", _D.client_momentum, "Momentum for --client_optimizer=sgdm.")
flags.DEFINE_enum("server_optimizer", _D.server_optimizer, list(OPTIMIZERS), "Dense methods: optax optimizer the server applies to -(aggregated update); sgd with lr 1 is FedAvg.")
flags.DEFINE_float("server_lr", _D.server_lr, "Server learning rate for dense methods (0 = the method's default: 1, or 3e-3 for signsgd's majority vote).")
flags.DEFINE_float("server_momentum", _D.server_momentum, "Momentum for --server_optimizer=sgdm.")
flags.DEFINE_float("topk_fraction", _D.topk_fraction, "topk: fraction of the update's entries sent.")
flags.DEFINE_integer("qsgd_levels", _D.qsgd_levels, "qsgd: quantisation levels s.")
flags.DEFINE_integer("qsgd_bucket", _D.qsgd_bucket, "qsgd: entries per bucket (one norm each).")
flags.DEFINE_integer("drive_chunk", _D.drive_chunk, "drive: Hadamard rotation size (a power of 2; one scale per chunk).")
flags.DEFINE_float("validation_fraction", _D.validation_fraction, "Hold out this fraction of the training set and evaluate on it instead of the test set (for tuning; 0 = test set).")
flags.DEFINE_enum("split", _D.split, list(SPLITS), "iid | noniid (reference: consecutive classes) | dirichlet.")
flags.DEFINE_integer("classes_per_client", _D.classes_per_client, "For --split=noniid.")
flags.DEFINE_float("dirichlet_alpha", _D.dirichlet_alpha, "For --split=dirichlet (> 0).")
flags.DEFINE_integer("max_examples_per_client", _D.max_examples_per_client, "Cap on each client's examples (0 = no cap).")
flags.DEFINE_integer("seed", _D.seed, "Seed of frozen weights, partition, cohorts and masks.")
flags.DEFINE_string("workdir", _D.workdir, "Where metrics.jsonl and summary.json go.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate every this many rounds (and at the last).")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Test batch size; one fresh mask per test batch.")
flags.DEFINE_integer("prior_reset_period", _D.prior_reset_period, "Reset the server's Beta prior every this many rounds (1 = reference).")
flags.DEFINE_float("lambda0", _D.lambda0, "Beta prior alpha = beta = lambda0 (>= 1).")
flags.DEFINE_float("epsilon", _D.epsilon, "Mask smoothing 0->eps, 1->1-eps before aggregation.")
flags.DEFINE_enum("weight_init", _D.weight_init, list(models.WEIGHT_INITS), "Frozen weights: +-e*sqrt(1/fan_in) (reference) or +-sqrt(2/fan_in).")
flags.DEFINE_enum("mask_gradient", _D.mask_gradient, list(masking.GRADIENTS), "Surrogate gradient through the mask sample.")
flags.DEFINE_bool("persistent_client_optimizer", _D.persistent_client_optimizer, "Keep each client's Adam state across its rounds (reference quirk).")
flags.DEFINE_integer("client_chunk_size", _D.client_chunk_size, "Clients trained at once under vmap (0 = chosen per backend).")
flags.DEFINE_enum("strategy", _D.strategy, ["auto", *engine.STRATEGIES], "Round execution: scan (one program) or host_loop (jitted steps driven from Python; fast for convs on XLA:CPU); auto picks per backend and model.")
flags.DEFINE_bool("cpu_ynn_fusions", _D.cpu_ynn_fusions, "On CPU, keep XLA's YNNPACK fusions (jaxlib's default); off by default because its convolutions are slower here (docs/benchmarks.md).")
flags.DEFINE_integer("num_devices", _D.num_devices, "Devices on the 'clients' mesh axis (0 = all local devices).")
flags.DEFINE_bool("coded_uplink", _D.coded_uplink, "Range-code every uplink mask (constriction) on the host, report measured sizes, aggregate the decoded masks.")
flags.DEFINE_enum("downlink", _D.downlink, ["float32", "quantized", "sampled_mask"], "Server broadcast: float32 scores (32 bpp), theta_g quantised to --downlink_bits, or one sampled mask.")
flags.DEFINE_integer("downlink_bits", _D.downlink_bits, "Bits per entry for --downlink=quantized (1..16).")
flags.DEFINE_enum("export_mask", _D.export_mask, list(EXPORT_MASKS), "Mask methods' final model file <workdir>/model.fmjx: one mask sampled from theta_g, or 1[theta_g > 0.5] (auto: sampled for fedpm, thresholded for fedmask).")
flags.DEFINE_bool("tensorboard", _D.tensorboard, "Write TensorBoard scalars to <workdir>/tensorboard.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Save an orbax checkpoint every N rounds (0 = never) in <workdir>/checkpoints.")
flags.DEFINE_bool("resume", _D.resume, "Continue the run in --workdir from its latest checkpoint.")
flags.DEFINE_bool("allow_config_change", _D.allow_config_change, "With --resume: continue even if the flags differ from the workdir's config.json.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host; coordinator from the environment, see README).")
flags.DEFINE_string("data_dir", _D.data_dir, "TFDS data folder (default ~/tensorflow_datasets).")
flags.DEFINE_string("archive_dir", _D.archive_dir, "Folder holding the original dataset archives.")
flags.DEFINE_bool("download", _D.download, "Download missing archives when online.")


def config_from_flags() -> RunConfig:
    return RunConfig(
        dataset=F.dataset, model=F.model, width=F.width,
        mlp_hidden=tuple(int(h) for h in F.mlp_hidden), algorithm=F.algorithm,
        num_clients=F.num_clients, clients_per_round=F.clients_per_round, rounds=F.rounds,
        local_epochs=F.local_epochs, batch_size=F.batch_size, client_lr=F.client_lr,
        client_optimizer=F.client_optimizer, client_momentum=F.client_momentum,
        server_optimizer=F.server_optimizer, server_lr=F.server_lr,
        server_momentum=F.server_momentum, topk_fraction=F.topk_fraction,
        qsgd_levels=F.qsgd_levels, qsgd_bucket=F.qsgd_bucket, drive_chunk=F.drive_chunk,
        validation_fraction=F.validation_fraction,
        split=F.split, classes_per_client=F.classes_per_client,
        dirichlet_alpha=F.dirichlet_alpha, max_examples_per_client=F.max_examples_per_client,
        seed=F.seed, workdir=F.workdir, eval_every=F.eval_every,
        eval_batch_size=F.eval_batch_size, prior_reset_period=F.prior_reset_period,
        lambda0=F.lambda0, epsilon=F.epsilon, weight_init=F.weight_init,
        mask_gradient=F.mask_gradient, persistent_client_optimizer=F.persistent_client_optimizer,
        client_chunk_size=F.client_chunk_size, strategy=F.strategy,
        cpu_ynn_fusions=F.cpu_ynn_fusions, num_devices=F.num_devices,
        coded_uplink=F.coded_uplink, downlink=F.downlink, downlink_bits=F.downlink_bits,
        export_mask=F.export_mask, checkpoint_every=F.checkpoint_every, resume=F.resume, tensorboard=F.tensorboard,
        allow_config_change=F.allow_config_change, data_dir=F.data_dir, archive_dir=F.archive_dir,
        download=F.download,
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TFDS and JAX log every file they open at INFO
    if F.distributed:
        import jax

        jax.distributed.initialize()  # reads the coordinator address, process count and id
    try:
        run(config_from_flags())
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
