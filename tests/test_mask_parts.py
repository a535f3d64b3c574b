"""The parts mask methods are composed of (``algorithms/masks/``): codecs and the randomized
response wrapper, downlinks, the part configs, and a new codec composed into a method."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import masking, models, privacy
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.algorithms import fedpm_host, registry
from fedmask_jax.algorithms.base import Batch
from fedmask_jax.algorithms.masks import beta_server, codecs, downlink, klms, randomized_response as rr
from fedmask_jax.algorithms.masks import training
from fedmask_jax.config import flag_fields

SCORES = {"a": jax.random.normal(jax.random.key(0), (40, 7)),
          "b": {"c": jax.random.normal(jax.random.key(1), (33,))}}
BROADCAST = jax.tree.map(lambda s: 0.5 * s, SCORES)
N = models.count_entries(SCORES)


def test_randomized_response_around_the_thresholded_codec_flips_the_thresholded_mask():
    eps, key = 0.5, jax.random.key(7)
    codec = rr.with_randomized_response(codecs.thresholded_mask(), eps)
    sent = codec.encode(SCORES, BROADCAST, key)
    leaves, treedef = jax.tree.flatten(SCORES)
    keys = jax.random.split(key, len(leaves))
    flip = privacy.flip_probability(eps)
    expected = jax.tree.unflatten(treedef, [
        rr.randomized_response(jax.random.fold_in(k, rr.RR_STREAM), masking.threshold_mask(s), flip)
        for k, s in zip(keys, leaves)])
    jax.tree.map(np.testing.assert_array_equal, sent, expected)
    assert codec.decode(sent, BROADCAST, key) is sent  # the server counts the flipped mask
    # The message's bits and code lengths are those of the flipped mask, not of the one kept.
    inner = codecs.thresholded_mask()
    assert float(codec.bits(sent)) == float(inner.bits(sent))
    assert codec.metrics(sent, sent, SCORES, BROADCAST) == inner.metrics(sent, sent, SCORES, BROADCAST)
    # The server's counts are debiased, then clipped to [0, K].
    counts, k = jnp.array([0.0, 1.0, 2.5, 4.0]), jnp.float32(4)
    np.testing.assert_allclose(codec.server_counts(counts, k),
                               np.clip((np.asarray(counts) - 4 * flip) / (1 - 2 * flip), 0, 4), rtol=1e-6)


def test_randomized_response_wraps_only_binary_mask_codecs():
    with pytest.raises(ValueError, match="flips a binary mask"):
        rr.with_randomized_response(klms.klms_codec(fedpm_lib.KLMSConfig()), 1.0)


@pytest.mark.parametrize("codec", [codecs.sampled_mask(), codecs.thresholded_mask()], ids=lambda c: c.name)
def test_a_binary_codecs_bits_are_its_messages(codec):
    message = codec.encode(SCORES, BROADCAST, jax.random.key(3))
    flat = models.flat(message)
    assert set(np.unique(flat)) <= {0.0, 1.0}
    # The size is a function of what is sent: another message with as many ones costs as much.
    assert float(codec.bits(message)) == float(masking.mask_bits(jnp.float32(flat.sum()), N))
    shuffled = models.unflat(np.random.default_rng(0).permutation(flat), message)
    assert float(codec.bits(shuffled)) == float(codec.bits(message))
    metrics = codec.metrics(message, message, SCORES, BROADCAST)
    assert float(metrics["mask_density"]) == pytest.approx(flat.mean())
    theta = models.flat(jax.tree.map(jax.nn.sigmoid, BROADCAST)).astype(np.float64)
    prior = -np.sum(np.log2(np.where(flat > 0, theta, 1 - theta)))
    assert float(metrics["uplink_bpp_coded_prior"]) * N == pytest.approx(prior, rel=1e-5)
    packed = codecs.packed_mask(message, N)
    np.testing.assert_array_equal(np.unpackbits(np.asarray(packed))[:N], flat.astype(np.uint8))


def test_klms_codec_bits_are_its_messages_blocks():
    cfg = fedpm_lib.KLMSConfig(klms_adaptive=False, klms_block_size=4, klms_samples_log2=3)
    codec = klms.klms_codec(cfg)
    key = jax.random.key(4)
    message = codec.encode(SCORES, BROADCAST, key)
    assert float(codec.bits(message)) == int(message.blocks) * 3 == -(-N // 4) * 3
    mask = codec.decode(message, BROADCAST, key)
    assert jax.tree.structure(mask) == jax.tree.structure(SCORES)
    assert float(codec.metrics(message, mask, SCORES, BROADCAST)["mask_density"]) == pytest.approx(
        models.flat(mask).mean())


def test_downlinks_compress_and_count():
    theta = {"t": jnp.array([0.0, 0.1, 0.49, 0.5, 0.97, 1.0])}
    q = downlink.quantized(2, 6)
    np.testing.assert_allclose(q.compress_broadcast(theta, None, 0.01)["t"],
                               [0.125, 0.125, 0.375, 0.625, 0.875, 0.875])
    assert float(q.downlink_bits(theta)) == 12
    assert float(downlink.float32(6).downlink_bits(theta)) == 32 * 6
    s = downlink.sampled_mask(6)
    sent = np.asarray(s.compress_broadcast(theta, jax.random.key(0), 0.01)["t"])
    np.testing.assert_allclose(np.minimum(np.abs(sent - 0.01), np.abs(sent - 0.99)), 0, atol=1e-6)
    assert sent[0] == pytest.approx(0.01) and sent[-1] == pytest.approx(0.99)
    scores = {"t": jnp.log(sent) - jnp.log1p(-sent)}
    ones = float(np.sum(sent > 0.5))
    assert float(s.downlink_bits(scores)) == float(masking.mask_bits(jnp.float32(ones), 6))


def test_method_configs_are_their_parts():
    parts = (training.MaskTrainingConfig, beta_server.BetaServerConfig, downlink.DownlinkConfig,
             fedpm_host.CodingCheckConfig, fedpm_host.ExportConfig, rr.RandomizedResponseConfig)
    names = lambda classes: {f.name for c in classes for f in dataclasses.fields(c)}  # noqa: E731
    assert names([fedpm_lib.FedPMConfig]) == names(parts)
    assert names([fedpm_lib.KLMSConfig]) == names([*parts, klms.KLMSCodecConfig])
    assert not issubclass(fedpm_lib.KLMSConfig, fedpm_lib.FedPMConfig)
    assert {f.name for f in flag_fields(klms.KLMSCodecConfig)}.isdisjoint(names([fedpm_lib.FedPMConfig]))
    # klms keeps the flags of the parts that do not apply to it, to refuse them by name.
    assert registry.method_config("klms", coded_uplink=False, mask_rr_epsilon=0.0).verified_clients(10) == 0
    for settings in ({"coded_uplink": True}, {"mask_rr_epsilon": 1.0}):
        with pytest.raises(ValueError, match=f"--{next(iter(settings))} does not apply to klms: its"):
            registry.method_config("klms", **settings)
    with pytest.raises(ValueError, match="--target_epsilon needs --mask_rr_epsilon"):
        rr.RandomizedResponseConfig(target_epsilon=2.0)


def test_a_new_codec_composes_into_a_method():
    """The worked example of docs/design.md: a new binary codec (here: the mask of the
    entries whose keep-probability is above 0.7), randomized response around it, FedPM's
    training, server and downlink."""

    def confident_mask():
        return codecs.binary_mask_codec("confident",
                                        lambda key, s: (jax.nn.sigmoid(s) > 0.7).astype(jnp.float32))

    model = models.build_model("mlp", 10, mlp_hidden=(16,))
    x = jnp.zeros((1, 8, 8, 1), jnp.uint8)
    cfg = fedpm_lib.FedPMConfig(mask_rr_epsilon=1.0)
    alg = fedpm_lib.mask_method(model, x, cfg, fedpm_lib.binary_uplink(confident_mask), "confident")
    server = alg.server_init(jax.random.key(0))
    state = alg.client_init(server, alg.persistent_init())
    batch = Batch(jnp.ones((4, 8, 8, 1), jnp.uint8), jnp.arange(4), jnp.ones(4))
    state, _ = alg.client_step(server, state, batch, jax.random.key(1))
    result = alg.client_finish(server, state, (), jnp.int32(4), jax.random.key(2))
    assert {"uplink_bpp", "mask_density", "uplink_bpp_coded_prior"} <= set(result.metrics)
    assert float(alg.downlink_bits(server)) == 32 * alg.num_params  # the default float32 broadcast
    new = alg.server_update(server, result.contribution, jnp.int32(1))
    assert int(new.round) == 1
    assert all(np.isfinite(models.flat(new.scores)))
