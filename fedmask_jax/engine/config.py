"""What a round program is compiled with: ``EngineConfig`` and the XLA options.

``strategy`` (``STRATEGIES``) says how a round runs (see ``RoundFn``); ``EngineConfig`` says
what it runs: batch, epochs, client chunk, how a chunk's gradients are taken
(``CLIENT_GRADS``), the messages it collects and how its runs are vectorized.
"""

from __future__ import annotations

import dataclasses

import jax


STRATEGIES = ("scan", "host_loop")
CLIENT_GRADS = ("per_client", "summed")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 128
    local_epochs: int = 3
    client_chunk_size: int = 1  # clients vmapped together; chunks run in sequence
    # How a vmapped chunk's gradients are taken (chunks of one: always each client's own):
    # per_client vmaps each client's client_step; summed differentiates the sum of the chunk's
    # objectives (methods with a separable step only, see FederatedAlgorithm) -- the same
    # gradients, but a grouped conv's filter gradient becomes cuDNN's grouped backward-filter
    # kernel instead of a forward conv over transposed copies of the activations.
    client_grad: str = "per_client"
    cpu_ynn_fusions: bool = False  # keep XLA:CPU's YNNPACK fusions (see compiler_options)
    collect: int = 0  # cohort positions whose messages the round hands back
    per_client: tuple[str, ...] = ()  # client metrics the round hands back position by position
    # The round writes each client's contribution into a slot (``Contributions``) and leaves
    # the server as it was; ``RoundFn.aggregate`` applies them (buffered aggregation).
    store_contributions: bool = False
    runs_vectorized: int = 0  # of a program's runs, how many are vmapped together (0 = all)


# XLA:CPU in jaxlib 0.10 hands convolutions, reductions and some elementwise ops to YNNPACK
# ("ynn_fusion"s), whose kernels are slower than XLA's own for Conv4's layers on x86
# (docs/benchmarks.md: per layer and per round).
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(cfg: EngineConfig, backend: str | None = None) -> dict[str, str] | None:
    """XLA options for every program the engine compiles (``jax.jit(compiler_options=...)``).

    Passed per program rather than through ``XLA_FLAGS`` so that they hold however and
    whenever the process started JAX, and touch nothing else the process compiles.
    """
    if (backend or jax.default_backend()) != "cpu" or cfg.cpu_ynn_fusions:
        return None
    return dict(_NO_YNN)
