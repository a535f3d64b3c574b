"""The contract between a federated algorithm and the engine.

An algorithm is a bundle of pure functions (in the spirit of optax's ``init``/``update`` and
FedJAX's ``FederatedAlgorithm``). The engine owns rounds, cohorts, padding, chunking and
devices; it never looks inside the states or messages it moves around.

Aggregation is expressed as a *sum over clients*: each client returns a ``contribution``
pytree, the engine adds them up (over a chunk, over chunks, over devices) and hands the sum
to ``server_update``. Every aggregation rule of the methods we simulate (Beta counts, weighted
means, majority votes) is such a sum, and summing keeps memory bounded by the chunk of
clients trained at once rather than by the cohort.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any


class Batch(NamedTuple):
    """One local mini-batch. ``mask`` is 1 for real examples, 0 for padding rows."""

    x: jax.Array
    y: jax.Array
    mask: jax.Array


class ClientResult(NamedTuple):
    """What one client hands back at the end of its local training."""

    contribution: PyTree  # summed over the cohort, then given to server_update
    persistent: PyTree  # per-client state kept across rounds (() when none)
    metrics: dict[str, jax.Array]  # scalars, averaged over the cohort by the engine


class FederatedAlgorithm(NamedTuple):
    """Pure functions that define a method. All of them are traced inside one jitted round.

    server_init(key) -> server_state
    persistent_init() -> one client's persistent state (() when the method keeps none)
    client_init(server_state, persistent) -> client_state
    client_step(server_state, client_state, batch, key) -> (client_state, loss)
    client_finish(server_state, client_state, persistent, num_examples, key) -> ClientResult
    server_update(server_state, contribution_sum, num_clients) -> server_state
    evaluate(server_state, batch, key) -> dict of per-batch *sums* (the engine divides by the
        number of real examples)
    """

    name: str
    server_init: Callable[[jax.Array], PyTree]
    persistent_init: Callable[[], PyTree]
    client_init: Callable[[PyTree, PyTree], PyTree]
    client_step: Callable[[PyTree, PyTree, Batch, jax.Array], tuple[PyTree, jax.Array]]
    client_finish: Callable[[PyTree, PyTree, PyTree, jax.Array, jax.Array], ClientResult]
    server_update: Callable[[PyTree, PyTree, jax.Array], PyTree]
    evaluate: Callable[[PyTree, Batch, jax.Array], dict[str, jax.Array]]
    num_params: int  # entries the uplink message describes (for bits per parameter)
    # contribution -> flat uint8 array: the client's message as it leaves the device, for
    # methods whose messages are coded on the host (None: the engine never collects them).
    uplink_payload: Callable[[PyTree], jax.Array] | None = None
