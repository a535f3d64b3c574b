"""The contracts between a method, the engine and the run loop.

An algorithm is a bundle of pure functions (in the spirit of optax's ``init``/``update`` and
FedJAX's ``FederatedAlgorithm``). The engine owns rounds, cohorts, padding, chunking and
devices; it never looks inside the states or messages it moves around.

Aggregation is expressed as a *sum over clients*: each client returns a ``contribution``
pytree, the engine adds them up (over a chunk, over chunks, over devices) and hands the sum
to ``server_update``. Every aggregation rule of the methods we simulate (Beta counts, weighted
means, majority votes) is such a sum, and summing keeps memory bounded by the chunk of
clients trained at once rather than by the cohort.

A method is registered as a ``MethodSpec``: its config dataclass (which is also its set of
command-line flags), a builder of the algorithm, the ``HostHook``s it needs on the host
(the run loop calls them without knowing what they do), and the fields of its records that
the console, plots and tables show (``shows.Shows``; the sinks read it without knowing the
method).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple, Sequence

import jax

from fedmask_jax.algorithms.shows import Shows
from fedmask_jax.config import setting

PyTree = Any


# Mask and dense methods share the flag --client_lr: one declaration (a fresh field per
# class: dataclasses write into it).
def client_lr_setting():
    return setting(0.1, "Client learning rate (mask methods: Adam on the scores; dense methods: "
                   "--client_optimizer).", min=0, min_open=True, vary=True)


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
        one local step (``gradient_step`` builds it from the three functions below)
    client_finish(server_state, client_state, persistent, num_examples, key) -> ClientResult
        (its metrics include ``uplink_bpp``: the message's size in bits per parameter)
    server_update(server_state, contribution_sum, num_clients) -> server_state
    downlink_bits(server_state) -> the broadcast's size in bits (optional): what each client of
        the round downloads, a property of the server, so the engine reports it
        (``downlink_bpp``) even for a round no client reported in
    evaluate(server_state, batch, key) -> dict of per-batch *sums* (the engine divides by the
        number of real examples)

    A method whose local step is "gradient of a loss, then an update" also exposes the step's
    two halves, so that the engine may take the gradient itself (optional; None when the
    method's step is not of that form):

    client_params(client_state) -> params: what the step differentiates
    client_loss(server_state, client_state, params, batch, key) -> (objective, loss):
        ``objective`` is differentiated w.r.t. ``params``; ``loss`` is the reported train loss
    client_apply(server_state, client_state, grads) -> client_state: the optimizer update

    and ``client_step`` must equal ``gradient_step(client_params, client_loss, client_apply)``.
    With them the engine can differentiate the *sum* of a vmapped chunk's objectives instead
    of vmapping each client's gradient (``EngineConfig.client_grad``): clients share no
    parameters, so the per-client gradients are the same, but the sum's gradient of a
    per-client convolution is a grouped backward-filter convolution on the activations as they
    are (``batch_group_count``), where the vmapped gradient first copies every activation into
    a transposed layout.
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
    downlink_bits: Callable[[PyTree], jax.Array] | None = None
    # contribution -> flat uint8 array: the client's message as it would leave the device,
    # for methods whose messages the host codes (None: there is nothing to collect).
    uplink_payload: Callable[[PyTree], jax.Array] | None = None
    # The local step's two halves (see above; all three or none).
    client_params: Callable[[PyTree], PyTree] | None = None
    client_loss: Callable[[PyTree, PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, jax.Array]] | None = None
    client_apply: Callable[[PyTree, PyTree, PyTree], PyTree] | None = None

    @property
    def separable_step(self) -> bool:
        """Whether the local step is given as loss and update (the engine may then take the
        chunk's gradient as the gradient of its summed objective)."""
        return None not in (self.client_params, self.client_loss, self.client_apply)


def gradient_step(client_params: Callable, client_loss: Callable, client_apply: Callable) -> Callable:
    """``client_step`` from the step's halves: the gradient of the client's objective w.r.t.
    its params, then its update; returns (new client state, reported loss)."""

    def client_step(server, state, batch: Batch, key):
        grad_fn = jax.value_and_grad(lambda p: client_loss(server, state, p, batch, key), has_aux=True)
        (_, loss), grads = grad_fn(client_params(state))
        return client_apply(server, state, grads), loss

    return client_step


@dataclasses.dataclass(frozen=True)
class HostContext:
    """What a method's host hooks may know about the run."""

    algorithm: FederatedAlgorithm
    config: Any  # the method's config dataclass
    architecture: Any  # models.Architecture
    seed: int
    clients_per_round: int
    workdir: str | None  # None: write no files
    verbose: bool = True
    num_clients: int = 0  # the population N
    rounds: int = 0  # rounds the run is set to
    # Each round's reporting clients are a uniform sample of K of the N (no availability or
    # straggler drops in between): what a privacy accountant's sampling amplification assumes.
    uniform_sampling: bool = True
    # Every round waits for all of its clients (False: buffered aggregation, the server updating
    # whenever some of the clients in flight have finished).
    synchronous: bool = True


class HostHook:
    """Host-side work a method needs around the rounds; every method has a default.

    ``collect``: how many clients' messages per round the hook wants to see
    (``RoundOutput.collected``). ``before_round`` runs before the round is launched, with the
    run's server state, and may return a ticket (e.g. a copy of what the server broadcasts)
    handed to ``after_round``, which sees the run's collected messages and metrics
    (``loop.RoundView``) and returns record fields, or a ``Future`` of them for work that
    overlaps the next round; a failure raises ``RunFault``. ``finish`` returns summary
    fields. ``rounds_limit`` is the most rounds the run may take (e.g. before a privacy
    budget is spent; None: no limit).
    """

    collect: int = 0

    def rounds_limit(self) -> int | None:
        return None

    def header(self) -> str | None:
        return None

    def before_round(self, round_index: int, server: PyTree) -> Any:
        return None

    def after_round(self, round_index: int, output: Any, ticket: Any) -> dict | Future:
        return {}

    def finish(self, server: PyTree, history: Any) -> dict:
        return {}

    def close(self) -> None:
        pass


class RunFault(RuntimeError):
    """A check on the host found the run's results wrong; the run stops."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method: what it is, its settings, how to build it, what it does on the host."""

    name: str
    description: str  # one line: what each client sends
    config: type  # a frozen dataclass of ``config.setting`` fields
    build: Callable[[Any, Any], FederatedAlgorithm]  # (models.Architecture, config) ->
    masked: bool  # trains masks over frozen weights (else dense weights)
    host_hooks: Callable[[HostContext], Sequence[HostHook]] = lambda ctx: ()
    shows: Shows = Shows()  # its fields beyond every run's (default: none, as a plain dense method)
    # The method under study (FedPM) or one of its descendants, against which the others are
    # the comparison's baselines (experiments.compare's topN_baselines).
    studied: bool = False
