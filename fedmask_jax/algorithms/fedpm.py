"""FedPM: federated probabilistic masks with Bayesian (Beta) aggregation (Isik et al., 2023),
and its variants, composed from the parts in ``masks/``.

Clients train real scores s over frozen random weights with Adam (``masks.training``); each
uploads one binary mask m ~ Bernoulli(sigmoid(s)) (``masks.codecs``). The server smooths the
masks (0 -> eps, 1 -> 1 - eps), adds them to a Beta(alpha, beta) posterior per entry and
broadcasts the mode's logit (``masks.beta_server``, ``masks.downlink``). Defaults follow the
authors' code (docs/design.md, "The method"). FedMask sends the thresholded mask instead,
KLMS block indices; randomized response wraps a binary-mask codec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fedmask_jax import masking, models, privacy
from fedmask_jax.algorithms import fedpm_host
from fedmask_jax.algorithms.base import ClientResult, FederatedAlgorithm, MethodSpec, PyTree, gradient_step
from fedmask_jax.algorithms.fedpm_host import CodingCheckConfig, ExportConfig
from fedmask_jax.algorithms.masks import beta_server, codecs, downlink as downlink_lib, klms as klms_lib
from fedmask_jax.algorithms.masks import randomized_response as rr_lib, training
from fedmask_jax.algorithms.masks.beta_server import BetaServerConfig, FedPMServerState
from fedmask_jax.algorithms.masks.codecs import MaskCodec
from fedmask_jax.algorithms.masks.downlink import DownlinkConfig
from fedmask_jax.algorithms.masks.klms import KLMSCodecConfig
from fedmask_jax.algorithms.masks.randomized_response import RandomizedResponseConfig
from fedmask_jax.algorithms.masks.training import FedPMClientState, MaskTrainingConfig
# Reached through this module by callers that predate the parts.
from fedmask_jax.algorithms.masks.beta_server import FedPMHyper  # noqa: F401
from fedmask_jax.algorithms.masks.randomized_response import debias_counts, randomized_response  # noqa: F401
from fedmask_jax.algorithms.shows import CodedUplink, Column, SecondAccuracy, Shows
from fedmask_jax.config import check, setting


# A method's config inherits its parts' configs. Dataclass fields come in the reverse order of
# the bases: client training's first, as the record and help read best.
@dataclasses.dataclass(frozen=True)
class FedPMConfig(RandomizedResponseConfig, ExportConfig, CodingCheckConfig, DownlinkConfig, BetaServerConfig,
                  MaskTrainingConfig):
    """FedPM's (and FedMask's) settings; defaults follow the authors' code."""

    def __post_init__(self):
        check(self)
        self.check_randomized_response()


@dataclasses.dataclass(frozen=True)
class FedMaskConfig(FedPMConfig):
    """FedMask's settings: FedPM's, with the deterministic mask. Its config says so itself, so
    that every part reading it (training, the final model file's ``auto`` kind) agrees."""

    deterministic: bool = setting(True, "FedMask sends 1[s > 0], never a sample.", flag=False)


@dataclasses.dataclass(frozen=True)
class KLMSConfig(RandomizedResponseConfig, ExportConfig, CodingCheckConfig, KLMSCodecConfig, DownlinkConfig,
                 BetaServerConfig, MaskTrainingConfig):
    """FedPM-KLMS's settings: FedPM's training, server and downlink, and the KLMS codec's own.
    Its message is block indices, not a mask: the coding check (off here) and randomized
    response keep their flags only so that asking klms for them fails with the reason."""

    coded_uplink: bool = fedpm_host.coded_uplink_setting(False)

    def __post_init__(self):
        check(self)
        self.check_randomized_response()
        if self.coded_uplink:
            raise ValueError("--coded_uplink does not apply to klms: its uplink is block indices, "
                             "not a range-coded mask")
        if self.mask_rr_epsilon > 0:
            raise ValueError("--mask_rr_epsilon does not apply to klms: its message is a sample index")


def mask_method(model: nn.Module, sample_x: jax.Array, config, codec: Callable[[Any], MaskCodec],
                name: str) -> FederatedAlgorithm:
    """A mask method: ``masks.training`` of a masked Flax ``model`` (``sample_x``: one input
    batch for shapes), the uplink codec ``codec(config)``, the Beta server and ``config``'s
    downlink."""
    train = training.mask_training(model, sample_x, config)
    uplink = codec(config)
    num_params = train.num_params
    down = downlink_lib.downlink(config, num_params)

    def server_init(key):
        return beta_server.server_init(train.init_variables(key), key, config)

    def client_finish(server: FedPMServerState, state: FedPMClientState, persistent, num_examples, key):
        message = uplink.encode(state.scores, server.scores, key)
        mask = uplink.decode(message, server.scores, key)
        metrics = {"uplink_bpp": uplink.bits(message) / num_params,
                   **uplink.metrics(message, mask, state.scores, server.scores)}
        return ClientResult(mask, train.kept(state, persistent), metrics)

    def server_update(server: FedPMServerState, mask_counts, num_clients):
        chex.assert_trees_all_equal_shapes_and_dtypes(mask_counts, server.scores)
        k = num_clients.astype(jnp.float32)
        return beta_server.server_update(server, uplink.server_counts(mask_counts, k), k,
                                         down.compress_broadcast)

    return FederatedAlgorithm(
        name=name, server_init=server_init, persistent_init=train.persistent_init,
        client_init=train.client_init,
        client_step=gradient_step(train.client_params, train.client_loss, train.client_apply),
        client_finish=client_finish, server_update=server_update, evaluate=train.evaluate,
        num_params=num_params, downlink_bits=lambda server: down.downlink_bits(server.scores),
        uplink_payload=lambda mask: codecs.packed_mask(mask, num_params),
        client_params=train.client_params, client_loss=train.client_loss, client_apply=train.client_apply,
    )


def binary_uplink(codec: Callable[[], MaskCodec]) -> Callable[[RandomizedResponseConfig], MaskCodec]:
    """A binary-mask codec, inside randomized response when ``--mask_rr_epsilon`` > 0."""
    def make(config):
        if config.mask_rr_epsilon > 0:
            return rr_lib.with_randomized_response(codec(), config.mask_rr_epsilon)
        return codec()
    return make


def fedpm(model: nn.Module, sample_x: jax.Array, config: FedPMConfig,
          name: str = "fedpm") -> FederatedAlgorithm:
    """FedPM for a masked Flax ``model``; ``sample_x`` is one input batch for shapes."""
    return mask_method(model, sample_x, config, binary_uplink(codecs.sampled_mask), name)


def fedmask(model: nn.Module, sample_x: jax.Array, config: FedPMConfig) -> FederatedAlgorithm:
    """FedMask-style deterministic masks (Li et al. 2021) in FedPM's frame, its closest baseline.

    Clients train scores on the same frozen weights through the mask 1[sigmoid(s) > 0.5]
    (straight-through gradient to sigmoid(s)) and send that mask; the server averages the
    (epsilon-smoothed) masks -- FedPM's aggregation with lambda0 = 1 and a reset every round --
    and broadcasts the logit. The only difference from FedPM is where randomness sits: none
    in FedMask's forward pass or message.
    """
    return mask_method(model, sample_x, dataclasses.replace(config, deterministic=True),
                       binary_uplink(codecs.thresholded_mask), "fedmask")


def klms(model: nn.Module, sample_x: jax.Array, config: KLMSConfig) -> FederatedAlgorithm:
    """FedPM-KLMS: FedPM's training and server, the uplink coded by ``klms_encode``."""
    return mask_method(model, sample_x, config, klms_lib.klms_codec, "klms")


def theta(server: FedPMServerState) -> PyTree:
    """The global keep-probabilities sigmoid(scores)."""
    return masking.keep_probabilities(server.scores)


def _masked_model(arch: models.Architecture, config: MaskTrainingConfig) -> nn.Module:
    return arch.build(masked=True, weight_init=config.weight_init, mask_gradient=config.mask_gradient)


def _built(method: Callable) -> Callable:
    """A spec's builder: ``method(model, sample_x, config)`` on the architecture's masked model."""
    return lambda arch, cfg: method(_masked_model(arch, cfg), arch.sample_input(), cfg)


def _host_hooks(ctx):
    return [*fedpm_host.hooks(ctx), *privacy.accountant_hooks(ctx)]


# What a mask method's runs show: the thresholded model's accuracy beside the sampled one's,
# the masks coded with theta_g as the prior (checked by the host's range coder), the density.
SHOWS = Shows(
    columns=(Column("uplink_bpp_coded_prior", "coded", "{uplink_bpp_coded_global:.3f}/{:.3f}"),
             Column("verified_clients", "checked"),
             Column("mask_density", "density", "{:.3f}")),
    accuracy_also=SecondAccuracy("test_accuracy_thresholded", console="thr", summary="thresholded",
                                 curve="θ>0.5", first_curve="sampled mask"),
    coded_uplink=CodedUplink("cumulative_uplink_bits_coded_prior", "mean_uplink_bpp_coded_prior",
                             header="coded uplink bpp (θ_g prior)", curve="θ_g-coded",
                             also=("mean_uplink_bpp_coded_global",)),
    summary=(("final_model_bpp", ", final model {:.4f} bpp"),
             ("final_model_file_bpp", " (file {:.4f} bpp)"),
             ("mean_uplink_bpp_coded_prior",
              ", coded uplink {mean_uplink_bpp_coded_global:.4f} bpp global / {:.4f} bpp with theta_g"),
             ("mean_uplink_bpp_measured_prior", " (range coder: {:.4f} on {verified_clients_total} masks)")),
    results=("final_model_file_bpp",),
)

SPECS = (
    MethodSpec("fedpm", "FedPM: one sampled binary mask (< 1 bit per parameter after entropy coding)",
               FedPMConfig, _built(fedpm), masked=True, host_hooks=_host_hooks, shows=SHOWS, studied=True),
    MethodSpec("fedmask", "FedMask-style: the deterministic mask 1[sigmoid(s) > 0.5]",
               FedMaskConfig, _built(fedmask), masked=True, host_hooks=_host_hooks, shows=SHOWS),
    MethodSpec("klms", "FedPM-KLMS: per block of mask entries, the index of one of 2^b candidates "
               "drawn from theta_g with shared randomness (importance-sampled by q/p)",
               KLMSConfig, _built(klms), masked=True, host_hooks=_host_hooks, shows=SHOWS, studied=True),
)
