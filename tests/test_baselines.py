"""Every method in the registry, through the real engine on real digits: a few rounds reduce
the loss, and the uplink bits each client reports are what its message format costs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import engine, masking
from fedmask_jax.algorithms import fedavg as fedavg_lib
from fedmask_jax.algorithms import registry
from tests.helpers import DIGITS_ARCH, digits, digits_client_data

HIDDEN = (32,)
# Layer sizes of the 64-32-10 MLP in flat order (biases first within a layer, as flax sorts).
SEGMENTS = [32, 64 * 32, 10, 32 * 10]
N = sum(SEGMENTS)


def _expected_bits(name: str) -> float | None:
    """Each message format's size for this model, from its definition (None: data-dependent)."""
    return {
        "fedavg": 32 * N,
        "signsgd": N,
        "ef_signsgd": N + 32 * len(SEGMENTS),
        "topk": math.ceil(0.01 * N) * (32 + math.ceil(math.log2(N))),
        "terngrad": 2 * N + 32 * len(SEGMENTS),
        "drive": 4096 + 32,  # 2,410 entries: one rotation padded to 4,096, one scale
        "eden": 2 * 4096 + 32,  # 2 bits per rotated entry, one scale
    }.get(name)


def _build(name: str):
    # signsgd's majority vote moves every weight by the server step: a larger one for 3 rounds.
    settings = {"server_lr": 0.01} if name == "signsgd" else {}
    return registry.build(name, DIGITS_ARCH, registry.method_config(name, **settings))


def test_registry_layer_sizes_match_the_model():
    model = DIGITS_ARCH.build(masked=False)
    assert fedavg_lib.layer_sizes(model, jnp.zeros((1, 8, 8, 1), jnp.uint8)) == SEGMENTS


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_a_few_rounds_reduce_the_loss_and_bits_follow_the_definition(name):
    alg = _build(name)
    assert alg.num_params == N
    data, _ = digits_client_data(num_clients=4)
    ds = digits()
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test, jnp.int32)
    round_fn = engine.make_round_fn(alg, engine.EngineConfig(batch_size=32, local_epochs=2,
                                                             client_chunk_size=4))
    cohort = engine.make_cohort(np.arange(4, dtype=np.int32), 4)
    evaluate = engine.make_eval_fn(alg, 128)
    server = alg.server_init(jax.random.key(0))
    store = engine.init_store(alg, 4)
    before = float(evaluate(server, x_test, y_test, jax.random.key(9))["test_loss"])
    bits = []
    for r in range(3):
        server, store, metrics, *_ = round_fn(server, store, data, cohort, jax.random.key(r))
        bits.append(float(metrics["uplink_bpp"]) * N)
    after = evaluate(server, x_test, y_test, jax.random.key(9))
    assert float(after["test_loss"]) < 0.9 * before, (before, float(after["test_loss"]))
    assert float(after["test_accuracy"]) > 0.3
    if registry.is_mask_method(name):  # entropy of the mask's ones plus log2(n)
        assert all(0 < b <= N + math.log2(N) for b in bits)
    elif name == "qsgd":  # Elias-coded: at least the bucket norms and a sign per non-zero
        assert all(32 * math.ceil(N / 512) < b < 32 * N for b in bits)
    else:
        assert bits == pytest.approx([_expected_bits(name)] * 3, rel=1e-6)


def test_error_feedback_methods_keep_a_residual_per_client():
    alg = _build("topk")
    store = engine.init_store(alg, 4)
    assert store.shape == (4, N)
    data, _ = digits_client_data(num_clients=4)
    round_fn = engine.make_round_fn(alg, engine.EngineConfig(32, 1, 2))
    server = alg.server_init(jax.random.key(0))
    cohort = engine.make_cohort(np.array([0, 2], np.int32), 2)
    store = round_fn(server, store, data, cohort, jax.random.key(0)).store
    norms = np.linalg.norm(np.asarray(store), axis=1)
    assert norms[0] > 0 and norms[2] > 0 and norms[1] == 0 and norms[3] == 0


def test_majority_vote_is_the_sign_of_the_summed_signs():
    alg = _build("signsgd")
    server = alg.server_init(jax.random.key(0))
    votes = jnp.asarray(np.random.default_rng(0).choice([-3.0, -1.0, 1.0, 3.0], N))
    new = alg.server_update(server, (votes, ()), jnp.float32(3))  # (decoded sum, the vote's side sum)
    flat = lambda p: jax.flatten_util.ravel_pytree(p)[0]  # noqa: E731
    np.testing.assert_allclose(np.asarray(flat(new.params) - flat(server.params)),
                               0.01 * np.sign(np.asarray(votes)), rtol=1e-4, atol=1e-7)


def test_fedmask_sends_its_thresholded_mask():
    alg = _build("fedmask")
    server = alg.server_init(jax.random.key(0))
    state = alg.client_init(server, alg.persistent_init())
    result = alg.client_finish(server, state, (), jnp.int32(10), jax.random.key(1))
    jax.tree.map(lambda m, s: np.testing.assert_array_equal(m, np.asarray(s > 0, np.float32)),
                 result.contribution, server.scores)
    ones = sum(float(m.sum()) for m in jax.tree.leaves(result.contribution))
    assert float(result.metrics["uplink_bpp"]) * N == pytest.approx(
        float(masking.mask_bits(jnp.float32(ones), N)), rel=1e-6)
