import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import models

RNGS = {"params": jax.random.key(0), "frozen": jax.random.key(1), "mask": jax.random.key(2)}


@pytest.mark.parametrize("name,shape,classes,entries", [
    ("conv4", (28, 28, 1), 10, 1_933_258),
    ("conv6", (32, 32, 3), 10, 2_262_602),
    ("conv10", (32, 32, 3), 100, 19_197_092),
    ("mlp", (28, 28, 1), 10, 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),
])
def test_mask_entry_counts_match_design(name, shape, classes, entries):
    model = models.build_model(name, classes)
    v = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, *shape), jnp.uint8)))
    assert models.count_entries(v["params"]) == entries
    assert models.count_entries(v["frozen"]) == entries


def test_emnist_balanced_has_47_outputs_and_width_scales():
    model = models.build_model("conv4", 47, width=0.5)
    x = jnp.zeros((2, 28, 28, 1), jnp.uint8)
    v = jax.jit(model.init)(RNGS, x)
    assert jax.eval_shape(lambda: model.apply(v, x, rngs={"mask": jax.random.key(3)})).shape == (2, 47)
    assert v["params"]["MaskedConv_0"]["kernel"].shape == (3, 3, 1, 32)


@pytest.mark.parametrize("scheme,scale", [
    ("signed_constant", lambda f: math.e * math.sqrt(1 / f)),
    ("signed_kaiming", lambda f: math.sqrt(2 / f)),
])
def test_frozen_weights_are_signed_constants(scheme, scale):
    model = models.build_model("conv4", 10, weight_init=scheme)
    v = jax.jit(model.init)(RNGS, jnp.zeros((1, 28, 28, 1), jnp.uint8))
    conv = v["frozen"]["MaskedConv_1"]  # 3x3x64 -> 64: fan_in 576
    c = scale(576)
    for leaf in (conv["kernel"], conv["bias"]):
        np.testing.assert_allclose(np.abs(leaf), c, rtol=1e-6)
    assert 0.45 < float((conv["kernel"] > 0).mean()) < 0.55
    scores = v["params"]["MaskedConv_1"]["kernel"]
    assert abs(float(scores.mean())) < 0.05 and abs(float(scores.std()) - 1) < 0.05


def test_frozen_weights_reproducible_from_seed():
    model = models.build_model("mlp", 10)
    x = jnp.zeros((1, 8, 8, 1), jnp.uint8)
    init = jax.jit(model.init)
    a = init(RNGS, x)["frozen"]
    b = init(dict(RNGS, params=jax.random.key(9)), x)["frozen"]
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name,shape,classes", [
    ("mlp", (28, 28, 1), 10), ("conv4", (28, 28, 1), 47), ("conv6", (32, 32, 3), 10),
    ("conv10", (32, 32, 3), 100),
])
def test_dense_twins_have_as_many_weights_as_the_masked_model_has_entries(name, shape, classes):
    x = jnp.zeros((1, *shape), jnp.uint8)
    masked = jax.eval_shape(lambda: models.build_model(name, classes).init(RNGS, x))
    dense = jax.eval_shape(lambda: models.build_model(name, classes, masked=False).init(RNGS, x))
    assert set(dense) == {"params"}
    assert models.count_entries(dense["params"]) == models.count_entries(masked["params"])
    assert [l.shape for l in jax.tree.leaves(dense["params"])] == \
        [l.shape for l in jax.tree.leaves(masked["params"])]


def test_dense_twin_has_trainable_weights_only():
    model = models.build_model("conv4", 10, masked=False)
    v = jax.jit(model.init)(RNGS, jnp.zeros((1, 28, 28, 1), jnp.uint8))
    assert "frozen" not in v
    assert models.count_entries(v["params"]) == 1_933_258


def test_threshold_mode_is_deterministic():
    model = models.build_model("mlp", 10).clone(mask_mode="threshold")
    x = jnp.ones((3, 8, 8, 1), jnp.uint8)
    v = jax.jit(model.init)(RNGS, x)
    np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))


def test_unknown_model_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet", 10)


def test_max_pool_matches_flax_including_odd_sizes_and_its_gradient_at_ties():
    import flax.linen as nn

    pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731 -- select-and-scatter
    for shape in [(2, 28, 28, 3), (2, 7, 7, 4)]:
        # Small integers: most windows have tied maxima.
        x = jax.random.randint(jax.random.key(0), shape, 0, 3).astype(jnp.float32)
        np.testing.assert_array_equal(models.max_pool_2x2(x), pool(x))
        g = jax.random.normal(jax.random.key(1), pool(x).shape)
        ours = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) * g))(x)
        np.testing.assert_array_equal(ours, jax.grad(lambda x: jnp.sum(pool(x) * g))(x))


@pytest.mark.parametrize("window,expected", [
    ([[5, 5], [1, 2]], [[1, 0], [0, 0]]),  # [a, a, b, c]: all of it to the first a
    ([[1, 5], [5, 5]], [[0, 1], [0, 0]]),
    ([[0, 0], [0, 0]], [[1, 0], [0, 0]]),
    ([[1, 2], [3, 3]], [[0, 0], [1, 0]]),
    ([[1, 2], [3, 4]], [[0, 0], [0, 1]]),
])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(window, expected):
    x = jnp.asarray(window, jnp.float32).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: 3.0 * models.max_pool_2x2(x).sum())(x)
    np.testing.assert_array_equal(grad.reshape(2, 2), 3.0 * np.asarray(expected))


@pytest.mark.parametrize("weight_init", ["signed_constant", "signed_kaiming"])
def test_compiled_init_gives_the_eager_variables_bit_for_bit(weight_init):
    # On the MLP only: an eager conv init compiles so many small programs that it took 36 s here
    # (conv4 and conv6 were compared once, by hand: equal; docs/benchmarks.md, "The suite").
    arch = models.Architecture("mlp", 10, (8, 8, 1), mlp_hidden=(16,))
    key, x = jax.random.key(3), arch.sample_input()
    masked = arch.build(masked=True, weight_init=weight_init)
    k_scores, k_frozen, k_mask = jax.random.split(key, 3)
    eager = masked.init({"params": k_scores, "frozen": k_frozen, "mask": k_mask}, x)
    dense = arch.build(masked=False)
    for got, want in [(models.init_model_variables(masked, x, key), eager),
                      (models.init_dense_variables(dense, x, key), dense.init(key, x))]:
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
