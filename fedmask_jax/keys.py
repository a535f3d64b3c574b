"""The streams of a run's random keys, all from one seed.

Everything random in a run derives from ``jax.random.key(seed)`` folded with a stream number,
so that resuming, re-chunking or re-sharding a run draws the same numbers: 0 the server's
initial state (frozen weights, scores), 1 the rounds (then the round index; the engine folds
in client ids, epochs and steps), 2 evaluation (then the round index), 3 and 4 the masks of
the final model's size and file, 5 buffered aggregation's extra refills of its slots (then
the round index and the refill's).
"""

from __future__ import annotations

import jax

SERVER, ROUNDS, EVALUATION, FINAL_MODEL_SIZE, FINAL_MODEL_FILE, BUFFER_REFILLS = range(6)


def stream(seed: int, which: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), which)


def server_key(seed: int) -> jax.Array:
    """The key ``server_init`` gets in a run with this seed (a model file regenerates its
    frozen weights from it)."""
    return stream(seed, SERVER)


def round_key(seed: int, round_index: int) -> jax.Array:
    return jax.random.fold_in(stream(seed, ROUNDS), round_index)


def eval_key(seed: int, round_index: int) -> jax.Array:
    return jax.random.fold_in(stream(seed, EVALUATION), round_index)


def refill_key(seed: int, round_index: int, index: int) -> jax.Array:
    """The round key of buffered aggregation's ``index``-th extra refill in round ``round_index``
    (the slots beyond the round's own: before the first round, all but M)."""
    return jax.random.fold_in(jax.random.fold_in(stream(seed, BUFFER_REFILLS), round_index), index)
