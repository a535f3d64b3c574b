"""Buffered asynchronous aggregation (FedBuff; Nguyen et al., "Federated Learning with
Buffered Asynchronous Aggregation", 2022) on the simulated clock.

``--concurrency`` C clients are in flight at once, each in a slot that holds the server
version it downloaded, its contribution and the simulated time it finishes. One round of the
run is one server update:

1. the slots freed by the last update are refilled with clients sampled uniformly without
   replacement among the available clients not already in flight (keyed by (seed, round)
   as a synchronous cohort is); they download the current server at the clock's time, train
   (one storing round of the engine: ``EngineConfig.store_contributions``) and will finish
   after their latency, download, full local work and upload (``federation.client_seconds``);
2. the ``--buffer_size`` M slots that finish first (ties broken by client id) are aggregated,
   each weighted by ``--staleness`` s(tau), tau the server versions that passed since its
   download (``constant``: 1; ``poly:A``: 1 / (1 + tau)^A); the clock moves to the last of
   their finish times. The dense methods' server step takes sum_i s(tau_i) Delta_i / M
   (FedBuff's), FedPM's Beta server the weighted counts sum_i s(tau_i) m_i out of
   sum_i s(tau_i) (docs/design.md).

A round refills at most M slots as its own cohort; any other free slots (all but M before
the first round, or slots a round could not refill because too few clients were free) are
filled in the same round first, M clients at a time, at the same time and from the same
server. Where FedBuff refills a slot the moment it frees, here a slot that frees before the
M-th finisher waits for it (the refills of one update start together, at its time, from the
updated server); with M = 1 the two are the same. With C = M = K and clients that all take
the same time, every round is exactly the synchronous round (tested bit for bit).

This module is the host's side, numpy only: the slots' schedule and the staleness weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

AGGREGATIONS = ("sync", "buffered")
# What a buffered round records of its server update (with or without refills trained in it).
UPDATE_FIELDS = ("buffered_clients", "staleness_mean", "staleness_max")


def staleness_weights(spec: str, tau: np.ndarray) -> np.ndarray:
    """s(tau) of ``--staleness``: ``constant`` (1) or ``poly:A`` (1 / (1 + tau)^A)."""
    kind, _, args = spec.partition(":")
    tau = np.asarray(tau, np.float64)
    if kind == "constant" and not args:
        return np.ones_like(tau)
    if kind == "poly":
        return (1.0 + tau) ** -poly_exponent(spec)
    raise ValueError(f"--staleness={spec!r} is unknown; use constant or poly:A (weight 1/(1+staleness)^A)")


def poly_exponent(spec: str) -> float:
    try:
        a = float(spec.partition(":")[2])
    except ValueError:
        a = math.nan
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"--staleness={spec!r}: poly:A needs a finite A >= 0")
    return a


def check_staleness(spec: str) -> None:
    staleness_weights(spec, np.zeros(1))


class Schedule(NamedTuple):
    """One run's slots on the host (numpy): who is in each, the server version it trained
    from and when it finishes; the clock (the last update's time) and which slots the last
    update freed."""

    ids: np.ndarray  # [C] int64, -1 for a slot never filled
    version: np.ndarray  # [C] int64
    finish: np.ndarray  # [C] float64, simulated seconds
    free: np.ndarray  # [C] bool: to be refilled this round
    clock: np.ndarray  # [] float64
    updates: np.ndarray  # [] int64: the server's version (updates applied so far)


def empty_schedule(slots: int, padded: int) -> Schedule:
    """``slots`` slots to fill, and ``padded - slots`` that stay empty (the engine sums the
    slots in chunks)."""
    free = np.zeros(padded, bool)
    free[:slots] = True
    return Schedule(np.full(padded, -1, np.int64), np.zeros(padded, np.int64), np.zeros(padded, np.float64),
                    free, np.zeros((), np.float64), np.zeros((), np.int64))


class Refill(NamedTuple):
    """One run's refills of a round, as ``federation.RoundPlan`` gives a synchronous cohort
    (``steps``/``valid`` None: full work, every one reports), with the slots they go into."""

    clients: np.ndarray
    steps: None
    valid: None
    fields: dict
    slots: np.ndarray


def in_flight(s: Schedule) -> np.ndarray:
    return s.ids[(s.ids >= 0) & ~s.free]


def dispatched(s: Schedule, slots: np.ndarray, clients: np.ndarray, seconds: np.ndarray) -> Schedule:
    """``clients`` start in ``slots`` at the clock's time from the current server version and
    take ``seconds``."""
    ids, ver, fin, free = s.ids.copy(), s.version.copy(), s.finish.copy(), s.free.copy()
    ids[slots], ver[slots], fin[slots], free[slots] = clients, s.updates, s.clock + seconds, False
    return s._replace(ids=ids, version=ver, finish=fin, free=free)


class Update(NamedTuple):
    """What one server update took: its slots (in slot order), their weights and staleness,
    and the time it happened."""

    slots: np.ndarray
    weights: np.ndarray  # [C]: s(tau) on the taken slots, 0 elsewhere
    staleness: np.ndarray  # of the taken slots
    time: float


def next_update(s: Schedule, buffer_size: int, staleness: str) -> tuple[Update, Schedule]:
    """The ``buffer_size`` in-flight slots that finish first (ties: lower client id first)
    make the next server version; they are freed. With none in flight the server keeps its
    version."""
    busy = np.flatnonzero((s.ids >= 0) & ~s.free)
    order = busy[np.lexsort((s.ids[busy], s.finish[busy]))]
    taken = np.sort(order[:buffer_size])
    tau = int(s.updates) - s.version[taken]
    weights = np.zeros(len(s.ids), np.float32)
    weights[taken] = staleness_weights(staleness, tau)
    time = float(s.finish[taken].max()) if len(taken) else float(s.clock)
    free = s.free.copy()
    free[taken] = True
    return Update(taken, weights, tau, time), s._replace(free=free, clock=np.asarray(time, np.float64),
                                                         updates=np.asarray(int(s.updates) + bool(len(taken))))
