"""One round's clients as the round program takes them: ``Cohort``, padded to a multiple of
the client chunk (times the devices), with each position's weight, collect slot and step
budget. Which clients take part and how much work each gets done is the federation's
(``fedmask_jax.federation``); this module only lays it out."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fedmask_jax.federation import ALL_STEPS


class Cohort(NamedTuple):
    """One round's clients, padded to a multiple of the chunk (times the devices).

    Real clients come first; padding clients (and clients whose work does not count, such as
    dropped stragglers) have ``valid`` 0 and count for nothing. ``collect[p]`` is the slot of
    cohort position ``p`` in ``RoundOutput.collected`` or, for positions whose messages are
    not collected, the number of slots (out of range). ``steps[p]``: the most local steps
    (over all epochs) position ``p`` may take this round; ``ALL_STEPS`` (the federation's) for
    its full work.
    """

    ids: Any  # [P] int32
    valid: Any  # [P] float32
    collect: Any  # [P] int32
    steps: Any  # [P] int32


def make_cohort(clients: np.ndarray, multiple: int, collect: int = 0, seed: int = 0,
                round_index: int = 0, *, steps: np.ndarray | None = None, valid: np.ndarray | None = None,
                size: int = 0) -> Cohort:
    """Pads ``clients`` to a multiple of ``multiple`` (and to at least ``size`` positions, so
    that rounds with fewer clients keep the program's shapes) and picks ``collect`` of its
    positions (uniformly, keyed by (seed, round)) whose messages the round hands back.
    ``steps``/``valid``: each client's step budget and weight (default: full work, 1)."""
    k = len(clients)
    padded = -(-max(k, size, 1) // multiple) * multiple
    ids = np.zeros(padded, np.int32)
    ids[:k] = clients
    weights = np.zeros(padded, np.float32)
    weights[:k] = 1.0 if valid is None else valid
    budget = np.full(padded, ALL_STEPS, np.int32)
    if steps is not None:
        budget[:k] = steps
    slots = np.full(padded, collect, np.int32)
    if collect:
        if collect > padded:
            raise ValueError(f"cannot collect {collect} messages from a cohort of {padded}")
        # Only reporting clients' messages are collected: the first min(collect, reporting)
        # slots are filled, the rest stay empty.
        reporting = np.flatnonzero(weights[:k] > 0)
        taken = min(collect, len(reporting))
        chosen = reporting[np.random.default_rng([seed, round_index, 1]).choice(len(reporting), taken, replace=False)]
        slots[np.sort(chosen)] = np.arange(taken, dtype=np.int32)
    return Cohort(ids, weights, slots, budget)
