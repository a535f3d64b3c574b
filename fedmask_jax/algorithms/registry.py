"""Every method the simulator runs, by name: FedPM and the baselines it is compared against.

Mask methods train scores over frozen random weights and send binary masks; dense methods
train the weights and send a compressed model update (``fedavg.compressed_fedavg`` with one
of ``compressors``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from fedmask_jax.algorithms import compressors as C
from fedmask_jax.algorithms import fedavg as fedavg_lib
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.algorithms.base import FederatedAlgorithm

# name -> one line: what it sends. The order is the comparison's default order.
METHODS = {
    "fedpm": "FedPM: one sampled binary mask (< 1 bit per parameter after entropy coding)",
    "fedmask": "FedMask-style: the deterministic mask 1[sigmoid(s) > 0.5]",
    "fedavg": "FedAvg: the model update as 32-bit floats",
    "signsgd": "SignSGD, majority vote: sign of the update (1 bit per parameter)",
    "ef_signsgd": "EF-SignSGD: per-layer scaled signs with error feedback",
    "topk": "Top-k with error feedback: k values and their positions",
    "qsgd": "QSGD: s-level stochastic quantisation per bucket, Elias-coded",
    "terngrad": "TernGrad: per-layer scaled ternary update (2 bits per parameter)",
    "drive": "DRIVE: signs after a random Hadamard rotation, one scale per chunk",
}
MASK_METHODS = ("fedpm", "fedmask")

# Server step sizes when --server_lr is not given: 1 is plain FedAvg on the decoded mean;
# a majority vote moves every weight by the full step, so it needs a small one.
DEFAULT_SERVER_LR = {"signsgd": 3e-3}  # tuned on Fashion-MNIST (methods/signsgd.flags)


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    topk_fraction: float = 0.01
    qsgd_levels: int = 8
    qsgd_bucket: int = 512
    drive_chunk: int = 4096


def is_mask_method(name: str) -> bool:
    return name in MASK_METHODS


def default_server_lr(name: str) -> float:
    return DEFAULT_SERVER_LR.get(name, 1.0)


def compressor_for(name: str, num_params: int, segments: list[int],
                   cfg: CompressionConfig) -> C.Compressor:
    if name == "fedavg":
        return C.identity()
    if name == "signsgd":
        return C.sign()
    if name == "ef_signsgd":
        return C.error_feedback(C.scaled_sign(segments))
    if name == "topk":
        return C.error_feedback(C.top_k(cfg.topk_fraction, num_params))
    if name == "qsgd":
        return C.qsgd(cfg.qsgd_levels, cfg.qsgd_bucket, num_params)
    if name == "terngrad":
        return C.terngrad(segments)
    if name == "drive":
        return C.drive(cfg.drive_chunk, num_params)
    raise ValueError(f"--algorithm={name!r} is unknown; allowed: {', '.join(METHODS)}")


def build(name: str, model: nn.Module, sample_x: jax.Array, *,
          fedpm_config: fedpm_lib.FedPMConfig | None = None,
          fedavg_config: fedavg_lib.FedAvgConfig | None = None,
          compression: CompressionConfig | None = None) -> FederatedAlgorithm:
    """The method ``name`` for ``model`` (masked for mask methods, dense otherwise)."""
    if name == "fedpm":
        return fedpm_lib.fedpm(model, sample_x, fedpm_config or fedpm_lib.FedPMConfig())
    if name == "fedmask":
        return fedpm_lib.fedmask(model, sample_x, fedpm_config or fedpm_lib.FedPMConfig())
    if name not in METHODS:
        raise ValueError(f"--algorithm={name!r} is unknown; allowed: {', '.join(METHODS)}")
    fedavg_config = fedavg_config or fedavg_lib.FedAvgConfig(server_lr=default_server_lr(name))
    if name == "signsgd":
        fedavg_config = dataclasses.replace(fedavg_config, aggregation="majority_vote")
    segments = fedavg_lib.layer_sizes(model, sample_x)
    compressor = compressor_for(name, sum(segments), segments, compression or CompressionConfig())
    return fedavg_lib.compressed_fedavg(model, sample_x, fedavg_config, compressor, name=name)
