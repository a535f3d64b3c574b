import math

import numpy as np
import pytest

from fedmask_jax import coding


def _ideal(mask, p):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-(mask * np.log2(p) + (1 - mask) * np.log2(1 - p)).sum())


def test_global_code_round_trip_and_size():
    rng = np.random.default_rng(0)
    n = 100_000
    mask = (rng.uniform(size=n) < 0.2).astype(np.uint8)
    ones, words = coding.encode_global(mask)
    np.testing.assert_array_equal(coding.decode_global(ones, words, n), mask)
    f = mask.mean()
    ideal = n * -(f * math.log2(f) + (1 - f) * math.log2(1 - f))
    bits = coding.global_bits(words)
    assert ideal <= bits <= coding.max_bits(ideal, n)


def test_prior_code_round_trip_and_beats_global_when_prior_is_informative():
    rng = np.random.default_rng(1)
    n = 100_000
    theta = rng.beta(0.3, 0.3, n)  # polarised probabilities, as late in training
    mask = (rng.uniform(size=n) < theta).astype(np.uint8)
    words = coding.encode(mask, theta)
    np.testing.assert_array_equal(coding.decode(words, theta, n), mask)
    bits = coding.prior_bits(words)
    assert _ideal(mask, theta) - 1 <= bits <= coding.max_bits(_ideal(mask, theta), n)
    assert bits < 0.7 * coding.global_bits(coding.encode_global(mask)[1])


def test_a_sure_model_costs_the_coder_bits_per_entry_not_per_ideal_bit():
    """Fedmask's Conv4 run: a deterministic mask against a polarised theta_g has an ideal
    length of a few thousand bits over millions of entries. The range coder's rounding costs
    about 1e-4 bits an entry, so its real stream is more than 0.1% (plus the flush) over the
    ideal, and still correct; ``max_bits`` allows for it, with a margin of about two."""
    rng = np.random.default_rng(3)
    n = 2_000_000
    theta = np.where(rng.uniform(size=n) < 0.5, 1e-7, 1 - 1e-7)
    unsure = rng.uniform(size=n) < 1e-2
    theta[unsure] = rng.uniform(size=int(unsure.sum()))
    mask = (rng.uniform(size=n) < theta).astype(np.uint8)
    ideal, bits = coding.ideal_bits(mask, theta), coding.prior_bits(coding.encode(mask, theta))
    assert bits > ideal * 1.001 + 64  # what stopped fedmask at round 3
    assert bits <= coding.max_bits(ideal, n)
    per_entry = (bits - ideal - coding.FLUSH_BITS) / n
    assert coding.PER_SYMBOL_BITS / 10 < per_entry < coding.PER_SYMBOL_BITS / 2


def test_a_stream_under_the_wrong_model_exceeds_the_bound():
    """The allowance is tight enough to catch a coder that does not use theta_g: coding with
    probabilities 50% too high costs more than ``max_bits`` allows."""
    rng = np.random.default_rng(4)
    n = 1_000_000
    theta = rng.uniform(0.005, 0.02, n)
    mask = (rng.uniform(size=n) < theta).astype(np.uint8)
    ideal = coding.ideal_bits(mask, theta)
    assert coding.prior_bits(coding.encode(mask, theta)) <= coding.max_bits(ideal, n)
    assert coding.prior_bits(coding.encode(mask, 1.5 * theta)) > coding.max_bits(ideal, n)


def test_extreme_probabilities_stay_codable():
    mask = np.array([0, 1, 1, 0, 1], np.uint8)
    theta = np.array([0.0, 1.0, 0.0, 1.0, 0.5])  # two entries contradict their prior
    words = coding.encode(mask, theta)
    np.testing.assert_array_equal(coding.decode(words, theta, 5), mask)


def test_decoding_with_the_wrong_prior_gives_a_different_mask():
    rng = np.random.default_rng(2)
    theta = rng.uniform(size=5000)
    mask = (rng.uniform(size=5000) < theta).astype(np.uint8)
    words = coding.encode(mask, theta)
    assert not np.array_equal(coding.decode(words, 1 - theta, 5000), mask)


def test_three_bpp_figures_on_a_known_mask():
    """Reference ideal H_b(f) + log2(n)/n, the global code and the theta_g code, side by side."""
    import jax.numpy as jnp

    from fedmask_jax import masking

    n = 80_000
    mask = np.zeros(n, np.uint8)
    mask[: n // 4] = 1  # f = 0.25
    ideal = float(masking.mask_bits(jnp.float32(mask.sum()), n)) / n
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert ideal == pytest.approx(h + math.log2(n) / n, rel=1e-5)
    global_bpp = coding.global_bits(coding.encode_global(mask)[1]) / n
    assert abs(global_bpp - ideal) < 0.002
    # A prior that knows where the ones are (theta 0.95 there, 0.05 elsewhere).
    theta = np.where(mask > 0, 0.95, 0.05)
    prior_bpp = coding.prior_bits(coding.encode(mask, theta)) / n
    expected = -math.log2(0.95)
    assert prior_bpp == pytest.approx(expected, abs=0.002) and prior_bpp < 0.1 * global_bpp
