"""Golden values: one whole round of a model small enough to compute by hand (numpy, float64).

A linear classifier on two input features and two classes; two clients, one holding two
examples and one holding a single example (so its batch has a padding row); one local step
each; both clients trained together in one vmapped chunk. The expected server state after
the round is derived from the definitions alone: the softmax cross-entropy gradient, the
optimizer's first step, the message, and the aggregation.
"""

import math

import jax
import numpy as np
import pytest

from fedmask_jax import engine, models
from fedmask_jax.algorithms import registry

ARCH = models.Architecture("mlp", 2, (1, 1, 2), mlp_hidden=())
X = np.array([[[[0, 255]]], [[[51, 102]]], [[[255, 204]]]], np.uint8)  # [3, 1, 1, 2]
Y = np.array([1, 0, 1], np.int32)
PARTS = [np.array([0, 1]), np.array([2])]  # client 0: examples 0, 1; client 1: example 2


def _round(name, settings):
    alg = registry.build(name, ARCH, registry.method_config(name, **settings))
    data = engine.client_data_from_partition(X, Y, PARTS)
    cfg = engine.EngineConfig(batch_size=2, local_epochs=1, client_chunk_size=2)
    server = alg.server_init(jax.random.key(0))
    before = server._replace(key=None)
    before = jax.tree.map(np.asarray, before)  # a host copy: the round consumes its input
    out = engine.make_round_fn(alg, cfg)(server, engine.init_store(alg, 2), data,
                                         engine.make_cohort(np.arange(2, dtype=np.int32), 2),
                                         jax.random.key(1))
    return alg, before, out


def _inputs(rows):
    return (X[rows].reshape(len(rows), 2).astype(np.float64) / 255 - 0.5) / 0.5


def _loss_and_logit_grad(w, b, rows):
    """Mean cross-entropy over the client's examples and its gradient w.r.t. the logits."""
    x = _inputs(rows)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(2)[Y[rows]]
    loss = -np.mean(np.log((p * onehot).sum(1)))
    return loss, x, (p - onehot) / len(rows)


def test_fedavg_round_by_hand():
    lr = 0.5
    alg, before, out = _round("fedavg", {"client_lr": lr})
    w0 = before.params["Dense_0"]["kernel"].astype(np.float64)
    b0 = before.params["Dense_0"]["bias"].astype(np.float64)
    new_w, new_b, losses, norms = [], [], [], []
    for rows in PARTS:
        loss, x, g = _loss_and_logit_grad(w0, b0, rows)
        w, b = w0 - lr * x.T @ g, b0 - lr * g.sum(0)  # one SGD step
        new_w.append(w), new_b.append(b), losses.append(loss)
        norms.append(math.sqrt(((w - w0) ** 2).sum() + ((b - b0) ** 2).sum()))
    # FedAvg: server SGD at lr 1 on -(mean update) = the mean of the clients' weights.
    np.testing.assert_allclose(out.server.params["Dense_0"]["kernel"], np.mean(new_w, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.server.params["Dense_0"]["bias"], np.mean(new_b, 0), rtol=1e-5, atol=1e-6)
    assert float(out.metrics["train_loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(out.metrics["update_norm"]) == pytest.approx(np.mean(norms), rel=1e-5)
    assert float(out.metrics["uplink_bpp"]) == 32.0 and float(out.metrics["downlink_bpp"]) == 32.0


def _sigmoid(s):
    return 1 / (1 + np.exp(-s))


def _bits(p):
    return -np.log2(np.maximum(p, 1e-7))


def test_fedmask_round_by_hand():
    """FedMask (deterministic masks, straight-through): forward with m = 1[s > 0], gradient
    dL/ds = (dL/dW_eff * w) * sigmoid'(s), Adam's first step (-lr * g / (|g| + 1e-8)), the
    uplink mask 1[s' > 0], the server's mean of the eps-smoothed masks, its logit."""
    # lr 1 moves every score by ~1 against its gradient's sign: some masks flip, and the two
    # clients disagree on some entries (theta_g = 1/2 there), so the gradient's sign matters.
    lr, eps = 1.0, 0.01
    alg, before, out = _round("fedmask", {"client_lr": lr, "epsilon": eps})
    assert alg.num_params == 6
    frozen, scores = before.frozen["MaskedDense_0"], before.scores["MaskedDense_0"]
    w, wb = frozen["kernel"].astype(np.float64), frozen["bias"].astype(np.float64)
    s0, sb0 = scores["kernel"].astype(np.float64), scores["bias"].astype(np.float64)
    assert np.allclose(np.abs(w), math.e * math.sqrt(1 / 2))  # signed constants, fan-in 2
    masks, losses = [], []
    for rows in PARTS:
        m, mb = (s0 > 0).astype(float), (sb0 > 0).astype(float)
        loss, x, g = _loss_and_logit_grad(w * m, wb * mb, rows)
        gs = (x.T @ g) * w * _sigmoid(s0) * (1 - _sigmoid(s0))
        gsb = g.sum(0) * wb * _sigmoid(sb0) * (1 - _sigmoid(sb0))
        s1, sb1 = s0 - lr * gs / (np.abs(gs) + 1e-8), sb0 - lr * gsb / (np.abs(gsb) + 1e-8)
        masks.append(np.concatenate([(sb1 > 0).ravel(), (s1 > 0).ravel()]).astype(float))  # flax order: bias, kernel
        losses.append(loss)
    masks = np.array(masks)
    assert (masks[0] != masks[1]).any() and (masks[0] != (np.concatenate([sb0, s0.ravel()]) > 0)).any()
    theta = ((1 - 2 * eps) * masks + eps).mean(0)  # reset prior, lambda0 = 1: mean of smoothed masks
    got = np.concatenate([np.asarray(out.server.scores["MaskedDense_0"][k]).ravel() for k in ("bias", "kernel")])
    np.testing.assert_allclose(got, np.log(theta / (1 - theta)), rtol=1e-5)
    assert float(out.metrics["train_loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    n = 6
    f = masks.mean(1)
    h = -(f * np.log2(np.where(f > 0, f, 1)) + (1 - f) * np.log2(np.where(f < 1, 1 - f, 1)))
    assert float(out.metrics["uplink_bpp"]) == pytest.approx(np.mean(h + np.log2(n) / n), rel=1e-5)
    assert float(out.metrics["mask_density"]) == pytest.approx(f.mean(), rel=1e-6)
    # Code lengths: under the broadcast theta (the scores the clients started from) and under
    # each mask's own frequency (plus the 32-bit count).
    theta0 = _sigmoid(np.concatenate([sb0.ravel(), s0.ravel()]))
    prior = [_bits(np.where(m > 0, theta0, 1 - theta0)).sum() for m in masks]
    fc = np.clip(f, 1e-7, 1 - 1e-7)
    glob = [32 + (m * _bits(fc[i]) + (1 - m) * _bits(1 - fc[i])).sum() for i, m in enumerate(masks)]
    assert float(out.metrics["uplink_bpp_coded_prior"]) == pytest.approx(np.mean(prior) / n, rel=1e-5)
    assert float(out.metrics["uplink_bpp_coded_global"]) == pytest.approx(np.mean(glob) / n, rel=1e-5)
