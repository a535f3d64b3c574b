"""Evaluation of the server state on a test set, scanned in batches (one run or many)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedmask_jax.algorithms.base import Batch, FederatedAlgorithm


def make_eval_fn(alg: FederatedAlgorithm, eval_batch_size: int,
                 options: dict[str, str] | None = None, runs: int = 1, runs_vectorized: int = 0):
    """Returns ``evaluate(server, x, y, key) -> {metric: mean over examples}``.

    ``options``: XLA compiler options, e.g. ``compiler_options(cfg)``. ``runs > 1``: ``server``
    and ``key`` have a leading runs axis, the metrics too (the test set is shared);
    ``runs_vectorized`` of them are vmapped at a time (0 = all).

    The test set is scanned in batches; each batch gets its own key (so a sampled-mask
    evaluation draws a fresh mask per test batch, as the reference does).
    """

    def eval_fn(server, x, y, key):
        m = x.shape[0]
        nb = -(-m // eval_batch_size)
        pad = nb * eval_batch_size - m
        xb = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(nb, eval_batch_size, *x.shape[1:])
        yb = jnp.pad(y, (0, pad)).reshape(nb, eval_batch_size)
        mb = (jnp.arange(nb * eval_batch_size) < m).astype(jnp.float32).reshape(nb, -1)

        def body(acc, xs):
            i, bx, by, bm = xs
            sums = alg.evaluate(server, Batch(bx, by, bm), jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, acc, sums), None

        zero = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(alg.evaluate, server, Batch(xb[0], yb[0], mb[0]), key),
        )
        sums, _ = jax.lax.scan(body, zero, (jnp.arange(nb), xb, yb, mb))
        return {k: v / m for k, v in sums.items()}

    if runs > 1 and (not runs_vectorized or runs_vectorized >= runs):
        eval_fn = jax.vmap(eval_fn, in_axes=(0, None, None, 0))
    elif runs > 1:
        one_run = eval_fn

        def eval_fn(server, x, y, key):
            return jax.lax.map(lambda sk: one_run(sk[0], x, y, sk[1]), (server, key),
                               batch_size=runs_vectorized if runs_vectorized > 1 else None)
    return jax.jit(eval_fn, compiler_options=options)
