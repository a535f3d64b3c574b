"""Federated algorithms: each module builds a ``FederatedAlgorithm`` bundle of pure functions."""

from fedmask_jax.algorithms.base import Batch, ClientResult, FederatedAlgorithm

__all__ = ["Batch", "ClientResult", "FederatedAlgorithm"]
