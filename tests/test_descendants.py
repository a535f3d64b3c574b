"""FedPM's descendants and EDEN, each against its definition: klms's side-information coding,
the mask-entropy regulariser, EDEN's rotation and quantizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax.algorithms import compressors as C
from fedmask_jax.algorithms import fedpm as F
from fedmask_jax.algorithms import registry
from fedmask_jax.algorithms.masks import klms as K, training
from tests.helpers import DIGITS_ARCH, digits_client_data, run_round


def _probs(key, n, low=0.02, high=0.98):
    return jax.random.uniform(key, (n,), minval=low, maxval=high)


def test_klms_decoded_mask_is_the_candidate_each_index_names():
    cfg = F.KLMSConfig()
    q, p = _probs(jax.random.key(0), 4000), _probs(jax.random.key(1), 4000)
    key = jax.random.key(2)
    message = K.klms_encode(q, p, key, cfg)
    decoded = np.asarray(K.klms_decode(message, p, key, cfg))
    block_of, indices = np.asarray(message.block_of), np.asarray(message.indices)
    # Regenerate every candidate from the shared randomness alone (no private key, no q).
    shared = jax.random.fold_in(key, K.KLMS_SHARED)
    candidates = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(shared, j), p.shape) < np.asarray(p))
                           for j in range(2 ** cfg.klms_kl_rate)])
    expected = candidates[indices[block_of], np.arange(4000)]
    np.testing.assert_array_equal(decoded, expected.astype(np.float32))
    assert set(np.unique(indices[: int(message.blocks)])) <= set(range(2 ** cfg.klms_kl_rate))


def test_klms_adaptive_blocks_follow_the_kl_rule_and_bits_count_the_message():
    cfg = F.KLMSConfig(klms_kl_rate=3)
    q, p = _probs(jax.random.key(3), 5000), _probs(jax.random.key(4), 5000, 0.3, 0.7)
    message = K.klms_encode(q, p, jax.random.key(5), cfg)
    block_of = np.asarray(message.block_of)
    kl = np.asarray(K.kl_bits(q, p), np.float64)
    assert np.all(np.diff(block_of) >= 0) and block_of[0] == 0
    sizes = np.bincount(block_of)
    block_kl = np.bincount(block_of, weights=kl)
    assert sizes.max() <= K.KLMS_MAX_BLOCK
    # A block of more than one entry stays within the rate; adding the next entry would not.
    for b in range(len(sizes) - 1):
        if sizes[b] > 1:
            assert block_kl[b] <= 3 + 1e-4
        first_next = np.flatnonzero(block_of == b + 1)[0]
        assert block_kl[b] + kl[first_next] > 3 - 1e-4 or sizes[b] == K.KLMS_MAX_BLOCK
    assert int(message.blocks) == len(sizes)
    assert float(K.klms_bits(message, cfg)) == len(sizes) * (3 + 8)
    fixed = F.KLMSConfig(klms_adaptive=False, klms_block_size=8, klms_samples_log2=2)
    m = K.klms_encode(q[:100], p[:100], jax.random.key(6), fixed)
    assert int(m.blocks) == 13 and float(K.klms_bits(m, fixed)) == 13 * 2


def test_klms_with_many_candidates_samples_the_clients_posterior():
    """Minimal random coding: with 2^10 candidates for a block of KL < 1 bit, the chosen
    candidate is distributed (nearly) as q, whatever the prior p."""
    cfg = F.KLMSConfig(klms_adaptive=False, klms_block_size=2, klms_samples_log2=10)
    q, p = jnp.array([0.9, 0.2]), jnp.array([0.5, 0.5])
    draws = jax.vmap(lambda k: K.klms_decode(K.klms_encode(q, p, k, cfg), p, k, cfg))(
        jax.random.split(jax.random.key(7), 3000))
    freq = np.asarray(draws.mean(0))
    np.testing.assert_allclose(freq, [0.9, 0.2], atol=0.03)
    # With one candidate's worth of bits the choice can hardly move away from p.
    few = F.KLMSConfig(klms_adaptive=False, klms_block_size=2, klms_samples_log2=1)
    draws = jax.vmap(lambda k: K.klms_decode(K.klms_encode(q, p, k, few), p, k, few))(
        jax.random.split(jax.random.key(8), 3000))
    assert abs(float(draws[:, 0].mean()) - 0.9) > 0.1


def test_klms_round_reports_bits_kl_and_sends_the_decoded_mask():
    data, _ = digits_client_data(num_clients=4)
    alg = registry.build("klms", DIGITS_ARCH)
    out = run_round(alg, data, [0, 1], chunk=2)
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m["uplink_bpp"] == pytest.approx(m["klms_blocks"] * 10 / alg.num_params, rel=1e-6)
    assert m["klms_kl_bpp"] > 0 and 0 < m["mask_density"] < 1
    theta = np.concatenate([np.asarray(jax.nn.sigmoid(s)).ravel() for s in jax.tree.leaves(out.server.scores)])
    assert np.isfinite(theta).all()


def test_entropy_regulariser_gradient_matches_its_closed_form():
    scores = {"a": jax.random.normal(jax.random.key(0), (40, 3)) * 3, "b": jnp.linspace(-8, 8, 17)}
    n = 40 * 3 + 17
    grads = jax.grad(training.mean_mask_entropy)(scores)
    for name, s in scores.items():
        sig = jax.nn.sigmoid(s)
        np.testing.assert_allclose(grads[name], -s * sig * (1 - sig) / n, rtol=1e-5, atol=1e-8)
    # The value is the mean binary entropy (nats), computed the textbook way on moderate scores.
    s = scores["a"]
    sig = jax.nn.sigmoid(s)
    textbook = -(sig * jnp.log(sig) + (1 - sig) * jnp.log(1 - sig))
    assert float(training.mean_mask_entropy({"a": s})) == pytest.approx(float(textbook.mean()), rel=1e-5)


def test_entropy_regulariser_lowers_the_masks_entropy():
    data, _ = digits_client_data(num_clients=4)
    plain = registry.build("fedpm", DIGITS_ARCH)
    reg = registry.build("fedpm", DIGITS_ARCH, registry.method_config("fedpm", mask_entropy_reg=5.0))
    a, b = run_round(plain, data, [0, 1], chunk=2), run_round(reg, data, [0, 1], chunk=2)
    assert float(b.metrics["uplink_bpp_coded_prior"]) < float(a.metrics["uplink_bpp_coded_prior"])


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_eden_is_unbiased_over_many_rotations(bits):
    n = 3000
    x = jax.random.normal(jax.random.key(1), (n,)) * jnp.linspace(0.1, 2.0, n)
    eden = C.eden(bits, 1024, n)

    def once(key):
        message, _ = eden.encode(x, (), key)
        return eden.decode(message, key)

    draws = jax.lax.map(once, jax.random.split(jax.random.key(2), 2000), batch_size=250)
    mean, std = np.asarray(draws.mean(0)), np.asarray(draws.std(0))
    z = (mean - np.asarray(x)) / (std / math.sqrt(2000))
    assert np.abs(z).max() < 5.0 and abs(z.mean()) < 0.2
    # More bits, less error.
    err = float(jnp.mean(jnp.sum((draws - x) ** 2, axis=1)) / jnp.sum(x * x))
    assert err < {1: 0.6, 2: 0.15, 3: 0.05}[bits]


def test_eden_bits_and_one_bit_is_drive():
    n = 5000
    x = jax.random.normal(jax.random.key(3), (n,))
    key = jax.random.key(4)
    eden1, drive = C.eden(1, 1024, n), C.drive(1024, n)
    m1, md = eden1.encode(x, (), key)[0], drive.encode(x, (), key)[0]
    np.testing.assert_allclose(eden1.decode(m1, key), drive.decode(md, key), rtol=1e-5, atol=1e-6)
    m3 = C.eden(3, 1024, n).encode(x, (), key)[0]
    # 4 full chunks of 1,024 and a tail of 904 padded to 1,024: 5 scales.
    assert m3["levels"].size == 5 * 1024 and m3["scales"].size == 5
    assert float(C.eden(3, 1024, n).bits(m3)) == 3 * 5 * 1024 + 32 * 5
    np.testing.assert_allclose(C.lloyd_max_normal(4), [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)
