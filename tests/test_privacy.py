"""Differential privacy: DP-FedAvg's clipping and noise, randomized response on mask entries,
the accountant's epsilon against dp-accounting, the target epsilon, and bad DP settings."""

import dataclasses
import json
import math
import os

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp
from jax.flatten_util import ravel_pytree

from fedmask_jax import privacy
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.algorithms import registry
from fedmask_jax.simulation import RunConfig, run
from tests.helpers import DIGITS_ARCH, digits_client_data, run_round, small_fedpm

TINY = RunConfig(dataset="digits", model="mlp", mlp_hidden=(32,), num_clients=6, clients_per_round=3,
                 rounds=6, local_epochs=1, batch_size=32, verbose=False, tensorboard=False, plots=False)


def _dp_fedavg(**settings):
    return registry.build("fedavg", DIGITS_ARCH, registry.method_config("fedavg", **settings))


def _flat(params):
    return np.asarray(ravel_pytree(params)[0], np.float64)


def test_clipping_bounds_each_clients_contribution():
    data, _ = digits_client_data(num_clients=4)
    plain = _dp_fedavg(client_lr=0.5)
    before = _flat(plain.server_init(jax.random.key(0)).params)
    for client in range(4):
        free = _flat(run_round(plain, data, [client]).server.params) - before
        for clip in (0.05, 0.2, 100.0):
            alg = _dp_fedavg(client_lr=0.5, dp_clip=clip)
            out = run_round(alg, data, [client])
            moved = _flat(out.server.params) - before  # FedAvg with server lr 1: the client's update
            assert np.linalg.norm(moved) <= clip * (1 + 1e-5)
            if np.linalg.norm(free) > clip:  # clipped: the same direction, norm exactly the clip
                np.testing.assert_allclose(moved, free * clip / np.linalg.norm(free), rtol=1e-4, atol=1e-7)
                assert float(out.metrics["clipped_fraction"]) == 1.0
            else:
                np.testing.assert_allclose(moved, free, rtol=1e-5, atol=1e-7)


def test_noise_on_the_sum_has_std_noise_multiplier_times_clip():
    alg = _dp_fedavg(dp_clip=0.5, dp_noise_multiplier=2.0, server_lr=1.0)
    server = alg.server_init(jax.random.key(1))
    zeros = (jnp.zeros(alg.num_params), (jnp.float32(1.0), ()))  # decoded sum, (unclipped, mean)
    new = alg.server_update(server, zeros, jnp.float32(1.0))
    noise = -(_flat(new.params) - _flat(server.params))  # server lr 1: params - (noise / 1)
    assert abs(noise.std() - 1.0) < 4 * 1.0 / math.sqrt(2 * alg.num_params)
    assert abs(noise.mean()) < 4 / math.sqrt(alg.num_params)


def test_adaptive_clip_follows_the_geometric_rule():
    alg = _dp_fedavg(dp_clip=1.0, dp_clip_quantile=0.5, dp_clip_lr=0.2)
    server = alg.server_init(jax.random.key(1))
    # 3 of 4 clients unclipped: clip * exp(-0.2 * (3/4 - 0.5)); no noise on the count.
    new = alg.server_update(server, (jnp.zeros(alg.num_params), (jnp.float32(3.0), ())),
                            jnp.float32(4.0))
    assert float(new.aggregation.clip) == pytest.approx(math.exp(-0.2 * 0.25), rel=1e-6)
    cfg = registry.method_config("fedavg", dp_clip=1.0, dp_clip_quantile=0.5, dp_noise_multiplier=0.8,
                                 dp_count_stddev=1.0)
    assert cfg.update_noise_multiplier == pytest.approx((0.8 ** -2 - 2.0 ** -2) ** -0.5)


def test_randomized_response_flips_at_the_configured_rate_and_debiasing_is_unbiased():
    eps = 0.7
    p = privacy.flip_probability(eps)
    assert p == pytest.approx(1 / (1 + math.e ** 0.7))
    mask = (jax.random.uniform(jax.random.key(0), (200_000,)) < 0.3).astype(jnp.float32)
    sent = fedpm_lib.randomized_response(jax.random.key(1), mask, p)
    assert set(np.unique(np.asarray(sent))) <= {0.0, 1.0}
    rate = float(jnp.mean(sent != mask))
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / mask.size)
    # K clients' masks over many entries: the debiased count's mean is the true count.
    k, entries, draws = 5, 2000, 400
    truth = jax.random.bernoulli(jax.random.key(2), 0.4, (k, entries)).astype(jnp.float32)
    true_counts = truth.sum(0)
    est = jnp.stack([fedpm_lib.debias_counts(
        fedpm_lib.randomized_response(jax.random.key(10 + d), truth, p).sum(0), jnp.float32(k), p)
        for d in range(draws)])
    err = np.asarray(est.mean(0) - true_counts)
    per_draw_std = math.sqrt(k * p * (1 - p)) / (1 - 2 * p)
    assert abs(err.mean()) < 4 * per_draw_std / math.sqrt(draws * entries)
    assert np.abs(err).max() < 5 * per_draw_std / math.sqrt(draws)
    assert abs(float(est.std(0).mean()) - per_draw_std) < 0.05 * per_draw_std


def test_fedpm_with_randomized_response_sends_flipped_masks():
    data, _ = digits_client_data(num_clients=4)
    plain = run_round(small_fedpm(), data, [0, 1], chunk=2)
    noisy = run_round(small_fedpm(mask_rr_epsilon=0.01), data, [0, 1], chunk=2)
    # Nearly every entry is a coin flip: the sent masks' density is ~1/2, whatever the scores.
    assert abs(float(noisy.metrics["mask_density"]) - 0.5) < 0.02
    assert float(plain.metrics["mask_density"]) != pytest.approx(float(noisy.metrics["mask_density"]))
    theta = np.concatenate([np.asarray(jax.nn.sigmoid(s)).ravel() for s in jax.tree.leaves(noisy.server.scores)])
    assert np.isfinite(theta).all() and (theta > 0).all() and (theta < 1).all()


@pytest.mark.parametrize("z, n, k", [(1.0, 10, 10), (0.7, 100, 10), (3.0, 1000, 50)])
def test_epsilon_matches_dp_accounting_directly(z, n, k):
    accountant = privacy.Accountant(privacy.gaussian_round(z, n, k), 1e-5)
    for rounds in (1, 7, 40):
        direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.GaussianDpEvent(z / 2)  # replace-one: one client moves the sum by 2C
        if k < n:
            event = dp_accounting.SampledWithoutReplacementDpEvent(n, k, event)
        direct.compose(event, rounds)
        assert accountant.epsilon(rounds) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    if k == n:  # no sampling: RDP of the Gaussian is a/(2 m^2); the textbook conversion bounds it
        m = z / 2
        classic = min(40 * a / (2 * m * m) + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 200, 20000))
        assert accountant.epsilon(40) <= classic
    # More noise, less epsilon; more rounds, more.
    assert privacy.Accountant(privacy.gaussian_round(2 * z, n, k), 1e-5).epsilon(7) < accountant.epsilon(7)
    assert accountant.epsilon(8) > accountant.epsilon(7)


def test_noise_for_epsilon_inverts_the_accountant():
    z = privacy.noise_for_epsilon(4.0, 1e-5, 20, 100, 10)
    eps = privacy.Accountant(privacy.gaussian_round(z, 100, 10), 1e-5).epsilon(20)
    assert eps == pytest.approx(4.0, rel=1e-3)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_dp_fedavg_run_records_epsilon_and_stops_at_the_target(tmp_path):
    settings = dict(dp_clip=0.5, dp_noise_multiplier=1.2, dp_delta=1e-3)
    eps = privacy.Accountant(privacy.gaussian_round(1.2, 6, 3), 1e-3)
    target = (eps.epsilon(4) + eps.epsilon(5)) / 2  # room for 4 rounds, not 5
    summary = run(dataclasses.replace(TINY, algorithm="fedavg", workdir=str(tmp_path / "a"),
                                      method=dict(settings, target_epsilon=target)))
    records = _records(str(tmp_path / "a"))
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["epsilon"] == pytest.approx(eps.epsilon(r["round"]), rel=1e-9)
        assert r["dp_clip_norm"] == pytest.approx(0.5) and 0 <= r["clipped_fraction"] <= 1
    assert summary["stopped_at_target_epsilon"] is True and summary["epsilon"] <= target
    assert "test_accuracy" in records[-1]  # the last round is evaluated


@pytest.mark.slow
def test_fedpm_randomized_response_run_reports_both_epsilons(tmp_path):
    summary = run(dataclasses.replace(TINY, workdir=str(tmp_path / "a"), rounds=2,
                                      method=dict(mask_rr_epsilon=2.0, dp_delta=1e-3)))
    records = _records(str(tmp_path / "a"))
    n = registry.build("fedpm", DIGITS_ARCH).num_params
    expected = privacy.Accountant(privacy.randomized_response_round(2.0, n), 1e-3)
    assert [r["epsilon"] for r in records] == pytest.approx([expected.epsilon(1), expected.epsilon(2)])
    assert summary["epsilon_per_entry"] == 2.0 and summary["epsilon"] > 2.0


@pytest.mark.parametrize("method, match", [
    ({"dp_noise_multiplier": -1.0, "dp_clip": 1.0}, "--dp_noise_multiplier must be >= 0"),
    ({"dp_noise_multiplier": 1.0}, "--dp_noise_multiplier needs --dp_clip > 0"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "dp_delta": 0.2}, r"--dp_delta=0.2 must be below 1/--num_clients"),
    ({"target_epsilon": 3.0}, "--target_epsilon needs --dp_noise_multiplier > 0"),
    ({"dp_noise_multiplier": 0.3, "dp_clip": 1.0, "target_epsilon": 0.01, "dp_delta": 1e-3},
     "--target_epsilon=0.01: a single round already spends"),
    ({"dp_noise_multiplier": 2.0, "dp_clip": 1.0, "dp_clip_quantile": 0.5, "dp_count_stddev": 0.5},
     "--dp_count_stddev=0.5 must exceed half of --dp_noise_multiplier=2"),
])
def test_bad_dp_settings_fail_before_compute(tmp_path, no_compiling, method, match):
    with pytest.raises(ValueError, match=match):
        run(dataclasses.replace(TINY, algorithm="fedavg", workdir=str(tmp_path / "w"), method=method))


def test_dp_settings_belong_to_the_methods_that_have_them(tmp_path, no_compiling):
    with pytest.raises(ValueError, match="--dp_noise_multiplier does not apply to --algorithm=signsgd"):
        run(dataclasses.replace(TINY, algorithm="signsgd", workdir=str(tmp_path / "w"),
                                method={"dp_noise_multiplier": 1.0}))
    with pytest.raises(ValueError, match="--mask_rr_epsilon does not apply to --algorithm=fedavg"):
        run(dataclasses.replace(TINY, algorithm="fedavg", workdir=str(tmp_path / "w"),
                                method={"mask_rr_epsilon": 1.0}))


@pytest.mark.slow
def test_dp_calibrate_cli_prints_the_noise_for_the_target():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "experiments.dp_calibrate", "--target_epsilon=4", "--rounds=20",
                           "--num_clients=100", "--clients_per_round=10"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    z = float(proc.stdout.strip().split("=")[1])

    def epsilon(noise):  # two evaluations of the accountant, instead of the CLI's bisection again
        return privacy.Accountant(privacy.gaussian_round(noise, 100, 10), 1e-5).epsilon(20)

    # printed to 6 digits: a little more noise meets the target, a little less does not
    assert epsilon(z * (1 + 1e-5)) <= 4.0 < epsilon(z * (1 - 1e-5))
    bad = subprocess.run([sys.executable, "-m", "experiments.dp_calibrate", "--target_epsilon=4", "--rounds=20",
                          "--num_clients=10", "--dp_delta=0.5"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --dp_delta must be in (0, 1/--num_clients")
