"""Each uplink compressor: its message, its bit cost by definition, and what the server decodes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax.algorithms import compressors as C
from fedmask_jax.algorithms import registry

N = 1000
SEGMENTS = [600, 300, 100]


def _update(seed=0, n=N):
    return jax.random.normal(jax.random.key(seed), (n,)) * jnp.linspace(0.1, 2.0, n)


def _assert_unbiased(comp, u, seed, draws=4000):
    """The mean of many decodes is within 5 standard errors of the update, entry by entry.

    An entry rarely rounded away from zero may never be in ``draws`` samples, so its variance
    is bounded by |u| * (largest decoded magnitude) rather than read off the samples.
    """
    keys = jax.random.split(jax.random.key(seed), draws)
    decs = np.asarray(jax.vmap(lambda k: comp.decode(comp.encode(u, (), k)[0], k))(keys))
    u = np.asarray(u)
    variance = np.maximum(decs.var(0), np.abs(u) * np.abs(decs).max())
    z = np.abs(decs.mean(0) - u) / np.sqrt(variance / draws)
    assert z.max() < 5


def _roundtrip(comp, u, key=jax.random.key(1), state=None):
    state = comp.init(u.size) if state is None else state
    message, state = jax.jit(comp.encode)(u, state, key)
    return message, state, jax.jit(comp.decode)(message, key), float(comp.bits(message))


def test_identity_is_lossless_at_32_bits():
    u = _update()
    _, _, dec, bits = _roundtrip(C.identity(), u)
    np.testing.assert_array_equal(dec, u)
    assert bits == 32 * N


def test_sign_sends_one_bit_per_entry_and_zero_as_plus():
    u = _update().at[3].set(0.0)
    msg, _, dec, bits = _roundtrip(C.sign(), u)
    assert msg["signs"].dtype == jnp.int8 and set(np.unique(msg["signs"]).tolist()) == {-1, 1}
    np.testing.assert_array_equal(dec, np.where(np.asarray(u) >= 0, 1.0, -1.0))
    assert bits == N


def test_scaled_sign_uses_each_layers_mean_magnitude():
    u = _update()
    msg, _, dec, bits = _roundtrip(C.scaled_sign(SEGMENTS), u)
    assert bits == N + 32 * len(SEGMENTS)
    start = 0
    for size in SEGMENTS:
        part = np.asarray(u[start:start + size])
        np.testing.assert_allclose(np.asarray(dec[start:start + size]),
                                   np.sign(part) * np.abs(part).mean(), rtol=1e-5)
        start += size


def test_top_k_keeps_the_largest_entries_with_values_and_positions():
    u = _update()
    comp = C.top_k(0.05, N)
    msg, _, dec, bits = _roundtrip(comp, u)
    k = 50
    assert msg["values"].shape == (k,) and msg["positions"].shape == (k,)
    assert bits == k * (32 + math.ceil(math.log2(N)))
    expected = np.zeros(N, np.float32)
    top = np.argsort(-np.abs(np.asarray(u)))[:k]
    expected[top] = np.asarray(u)[top]
    np.testing.assert_array_equal(np.asarray(dec), expected)


@pytest.mark.parametrize("method, settings, message", [
    ("topk", {"topk_fraction": 0.0}, "--topk_fraction must be in (0, 1], got 0.0"),
    ("topk", {"topk_fraction": 1.5}, "--topk_fraction must be in (0, 1], got 1.5"),
    ("qsgd", {"qsgd_levels": 0}, "--qsgd_levels must be >= 1, got 0"),
    ("qsgd", {"qsgd_bucket": 0}, "--qsgd_bucket must be >= 1, got 0"),
    ("drive", {"drive_chunk": 1000}, "--drive_chunk must be a power of 2 >= 2, got 1000"),
    ("drive", {"drive_chunk": 1}, "--drive_chunk must be a power of 2 >= 2, got 1"),
    ("eden", {"eden_chunk": 1000}, "--eden_chunk must be a power of 2 >= 2, got 1000"),
    ("eden", {"eden_bits": 9}, "--eden_bits must be in [1, 8], got 9"),
    ("eden", {"eden_bits": 0}, "--eden_bits must be in [1, 8], got 0"),
])
def test_a_compressors_bad_setting_fails_in_its_method_config_naming_the_flag(method, settings, message):
    # The configs are the one check: the compressors trust what they are built with.
    with pytest.raises(ValueError) as error:
        registry.method_config(method, **settings)
    assert str(error.value) == message


def _elias_omega(n: int) -> str:
    """Textbook Elias omega code, as a bit string."""
    code = "0"
    while n > 1:
        b = bin(n)[2:]
        code = b + code
        n = len(b) - 1
    return code


def test_elias_omega_lengths_match_the_textbook_code():
    values = list(range(1, 1100)) + [2**16 - 1, 2**16, 2**20 + 5, 2**31 - 1]
    got = np.asarray(C.elias_omega_bits(jnp.asarray(values, jnp.int32)))
    assert got.tolist() == [len(_elias_omega(v)) for v in values]
    assert [_elias_omega(v) for v in (1, 2, 3, 4, 7, 16)] == ["0", "100", "110", "101000", "101110",
                                                             "10100100000"]


def test_qsgd_bits_are_the_elias_coded_message_and_decoding_is_unbiased():
    levels, bucket = 4, 128
    u = _update()
    comp = C.qsgd(levels, bucket, N)
    msg, _, dec, bits = _roundtrip(comp, u)
    q = np.asarray(msg["levels"])
    assert np.abs(q).max() <= levels and msg["norms"].shape == (-(-N // bucket),)
    # Code_s by hand: 32-bit norms, then per non-zero entry Elias(gap), sign, Elias(level).
    expected, previous = 32 * msg["norms"].size, -1
    for i in np.flatnonzero(q):
        expected += len(_elias_omega(int(i - previous))) + 1 + len(_elias_omega(int(abs(q[i]))))
        previous = i
    assert bits == expected
    # Stochastic rounding is unbiased: the mean of many decodes approaches the update.
    _assert_unbiased(comp, u, seed=5)


def test_terngrad_is_ternary_with_per_layer_scale_and_unbiased():
    u = _update()
    comp = C.terngrad(SEGMENTS)
    msg, _, dec, bits = _roundtrip(comp, u)
    assert set(np.unique(msg["ternary"]).tolist()) <= {-1, 0, 1}
    assert bits == 2 * N + 32 * len(SEGMENTS)
    np.testing.assert_allclose(np.asarray(msg["scales"]),
                               [np.abs(np.asarray(u[:600])).max(), np.abs(np.asarray(u[600:900])).max(),
                                np.abs(np.asarray(u[900:])).max()], rtol=1e-6)
    _assert_unbiased(comp, u, seed=6)


def test_fwht_matches_the_hadamard_matrix():
    from scipy.linalg import hadamard

    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 64)))
    np.testing.assert_allclose(np.asarray(C.fwht(jnp.asarray(x))), x @ hadamard(64).T, rtol=1e-5,
                               atol=1e-4)


def test_drive_sends_rotated_signs_and_its_scale_is_unbiased_per_chunk():
    chunk = 256
    u = _update()  # 1000 = 3 full chunks of 256 + a 232-entry tail padded to 256
    comp = C.drive(chunk, N)
    msg, _, dec, bits = _roundtrip(comp, u, key=jax.random.key(3))
    assert msg["signs"].dtype == jnp.int8 and msg["signs"].size == 1024
    assert bits == 1024 + 32 * 4
    # DRIVE's unbiased scale S = ||x||^2 / ||Rx||_1 makes <x_hat, x> = ||x||^2 in every chunk.
    x, d = np.asarray(u), np.asarray(dec)
    for lo in range(0, N, chunk):
        part = slice(lo, min(lo + chunk, N))
        np.testing.assert_allclose(d[part] @ x[part], x[part] @ x[part], rtol=1e-4)
    # The estimate points the right way, and the server needs the same key to undo the rotation.
    assert d @ x / (np.linalg.norm(d) * np.linalg.norm(x)) > 0.7
    wrong = np.asarray(comp.decode(msg, jax.random.key(4)))
    assert abs(wrong @ x) / (np.linalg.norm(wrong) * np.linalg.norm(x)) < 0.2


def test_drive_tail_is_padded_only_to_its_own_power_of_two():
    comp = C.drive(4096, 266_610)  # 65 full chunks + 370 left -> padded to 512
    msg, _ = comp.encode(jnp.ones(266_610), (), jax.random.key(0))
    assert msg["signs"].size == 65 * 4096 + 512 and msg["scales"].size == 66


@pytest.mark.parametrize("inner", [C.scaled_sign(SEGMENTS), C.top_k(0.02, N)])
def test_error_feedback_keeps_exactly_what_the_message_missed(inner):
    comp = C.error_feedback(inner)
    memory = comp.init(N)
    assert memory.shape == (N,) and not memory.any()
    total_sent, total_update = np.zeros(N), np.zeros(N)
    for r in range(5):
        u = _update(seed=r)
        msg, new_memory = comp.encode(u, memory, jax.random.key(r))
        dec = comp.decode(msg, jax.random.key(r))
        np.testing.assert_allclose(np.asarray(dec + new_memory), np.asarray(u + memory),
                                   rtol=1e-5, atol=1e-5)
        assert float(comp.bits(msg)) == float(inner.bits(msg))
        memory = new_memory
        total_sent += np.asarray(dec)
        total_update += np.asarray(u)
    # Nothing is lost, only delayed: what was sent plus the memory is everything.
    np.testing.assert_allclose(total_sent + np.asarray(memory), total_update, rtol=1e-4, atol=1e-4)
