import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import masking, models
from fedmask_jax.algorithms import fedpm as fedpm_lib
from tests.helpers import small_fedpm


def _random_masks(key, like, k):
    return [jax.tree.map(lambda s, kk=kk: jax.random.bernoulli(kk, 0.3, s.shape).astype(jnp.float32), like)
            for kk in jax.random.split(key, k)]


def test_reset_every_round_gives_mean_of_smoothed_masks():
    alg = small_fedpm(epsilon=0.01, lambda0=1.0, prior_reset_period=1)
    server = alg.server_init(jax.random.key(0))
    masks = _random_masks(jax.random.key(1), server.scores, 5)
    counts = jax.tree.map(lambda *m: sum(m), *masks)
    new = alg.server_update(server, counts, jnp.float32(5))
    expected = jax.tree.map(lambda *m: sum(masking.smooth_mask(x, 0.01) for x in m) / 5, *masks)
    jax.tree.map(lambda t, e: np.testing.assert_allclose(t, e, rtol=1e-5, atol=1e-6),
                 fedpm_lib.theta(new), expected)
    # A second round forgets the first: the result depends only on the new masks.
    again = alg.server_update(new, counts, jnp.float32(5))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                 fedpm_lib.theta(again), fedpm_lib.theta(new))


def test_longer_reset_period_accumulates_beta_posterior():
    lam, eps, k = 2.0, 0.05, 3
    alg = small_fedpm(epsilon=eps, lambda0=lam, prior_reset_period=3)
    server = alg.server_init(jax.random.key(0))
    rounds = [_random_masks(jax.random.key(r + 10), server.scores, k) for r in range(4)]
    alpha = beta = None
    for r, masks in enumerate(rounds):
        counts = jax.tree.map(lambda *m: sum(m), *masks)
        server = alg.server_update(server, counts, jnp.float32(k))
        v = jax.tree.map(lambda *m: sum(masking.smooth_mask(x, eps) for x in m), *masks)
        if r % 3 == 0:  # prior reset at rounds 0 and 3
            alpha = jax.tree.map(lambda s: lam + s, v)
            beta = jax.tree.map(lambda s: lam + k - s, v)
        else:
            alpha = jax.tree.map(lambda a, s: a + s, alpha, v)
            beta = jax.tree.map(lambda b, s: b + k - s, beta, v)
        mode = jax.tree.map(lambda a, b: (a - 1) / (a + b - 2), alpha, beta)
        jax.tree.map(lambda t, e: np.testing.assert_allclose(t, e, rtol=1e-5, atol=1e-6),
                     fedpm_lib.theta(server), mode)
    assert int(server.round) == 4


def test_client_message_is_a_binary_mask_with_reference_bits():
    alg = small_fedpm()
    server = alg.server_init(jax.random.key(0))
    state = alg.client_init(server, alg.persistent_init())
    result = alg.client_finish(server, state, (), jnp.int32(10), jax.random.key(1))
    leaves = jax.tree.leaves(result.contribution)
    assert all(set(np.unique(np.asarray(x)).tolist()) <= {0.0, 1.0} for x in leaves)
    ones = sum(float(x.sum()) for x in leaves)
    n = alg.num_params
    assert float(result.metrics["mask_density"]) == pytest.approx(ones / n)
    assert float(result.metrics["uplink_bpp"]) * n == pytest.approx(
        float(masking.mask_bits(jnp.float32(ones), n)), rel=1e-6)


def test_code_lengths_on_the_device_are_the_range_coders_ideal_and_it_reaches_them():
    """The round's per-client code lengths (theta_g prior and global frequency) equal the
    host's float64 ideal under the coder's own model, and constriction's real streams come
    within what a range coder may take for them (``coding.max_bits``)."""
    from fedmask_jax import coding

    alg = small_fedpm()
    server = alg.server_init(jax.random.key(0))
    # A polarised broadcast, as late in training, with entries at and past the clip.
    scores = jax.tree.map(lambda s: 6.0 * s, server.scores)
    scores = jax.tree.map(lambda s: s.at[..., 0].set(40.0).at[..., 1].set(-40.0), scores)
    server = server._replace(scores=scores)
    state = alg.client_init(server, alg.persistent_init())
    state = state._replace(scores=jax.tree.map(lambda s: s + 0.5, state.scores))  # it trained
    result = alg.client_finish(server, state, (), jnp.int32(10), jax.random.key(1))
    n = alg.num_params
    mask = np.asarray(models.flat(result.contribution)).astype(np.uint8)
    theta = models.flat(fedpm_lib.theta(server)).astype(np.float64)
    prior = float(result.metrics["uplink_bpp_coded_prior"]) * n
    glob = float(result.metrics["uplink_bpp_coded_global"]) * n
    assert prior == pytest.approx(coding.ideal_bits(mask, theta), rel=1e-5)
    assert glob == pytest.approx(coding.ideal_global_bits(mask), rel=1e-5)
    # The uplink payload is that mask, bit-packed.
    np.testing.assert_array_equal(np.unpackbits(np.asarray(alg.uplink_payload(result.contribution)))[:n], mask)
    for measured, ideal in ((coding.prior_bits(coding.encode(mask, theta)), prior),
                            (coding.global_bits(coding.encode_global(mask)[1]), glob)):
        assert ideal - 1 <= measured <= coding.max_bits(ideal, n)


def test_client_steps_reduce_loss_on_a_fixed_batch():
    from tests.helpers import digits
    from fedmask_jax.algorithms.base import Batch

    ds = digits()
    alg = small_fedpm(client_lr=0.1)
    server = alg.server_init(jax.random.key(0))
    state = alg.client_init(server, alg.persistent_init())
    batch = Batch(jnp.asarray(ds.x_train[:128]), jnp.asarray(ds.y_train[:128]), jnp.ones(128))
    step = jax.jit(alg.client_step)
    losses = []
    for i in range(60):
        state, loss = step(server, state, batch, jax.random.key(i))
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


@pytest.mark.parametrize("kwargs,match", [
    ({"epsilon": 0.0}, "epsilon"), ({"lambda0": 0.5}, "lambda0"),
    ({"prior_reset_period": 0}, "prior_reset_period"), ({"client_lr": -1.0}, "client_lr"),
    ({"client_lr": float("nan")}, "--client_lr must be a finite number"),
    ({"lambda0": float("nan")}, "--lambda0 must be a finite number"),
    ({"verify_coded_clients": "some"}, "--verify_coded_clients must be a number of clients"),
    ({"downlink": "carrier pigeon"}, "--downlink='carrier pigeon' is unknown"),
])
def test_bad_config_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fedpm_lib.FedPMConfig(**kwargs)
