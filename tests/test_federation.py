"""Heterogeneous clients: step budgets inside the compiled round, stragglers dropped or kept
with their partial work, availability, and the settings that leave no client able to join."""

import jax
import numpy as np
import pytest

from fedmask_jax import engine, federation
from fedmask_jax.algorithms import registry
from fedmask_jax.run_config import RunConfig
from tests.helpers import DIGITS_ARCH, digits_client_data, run_round, small_fedpm


def _host(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _trees_equal(a, b):
    return all(np.array_equal(_host(x), _host(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _fedavg():
    return registry.build("fedavg", DIGITS_ARCH, registry.method_config("fedavg"))


def test_a_client_with_half_the_budget_runs_half_the_steps():
    """Budget = one of two epochs' steps: exactly the round with one local epoch."""
    data, parts = digits_client_data(num_clients=4)
    steps_per_epoch = -(-len(parts[1]) // 64)
    for alg in (_fedavg(), small_fedpm()):
        half = run_round(alg, data, [1], epochs=2, steps=[steps_per_epoch])
        one_epoch = run_round(alg, data, [1], epochs=1)
        full = run_round(alg, data, [1], epochs=2)
        assert _trees_equal(half.server, one_epoch.server)
        assert not _trees_equal(half.server, full.server)
        # A budget at or above the full work changes nothing.
        assert _trees_equal(run_round(alg, data, [1], epochs=2, steps=[2 * steps_per_epoch]).server, full.server)


def test_dropped_client_counts_for_nothing_and_partial_differs():
    data, parts = digits_client_data(num_clients=4)
    alg = _fedavg()
    per_epoch = -(-len(parts[2]) // 64)
    without = run_round(alg, data, [0, 1], chunk=1)
    dropped = run_round(alg, data, [0, 1, 2], chunk=1, steps=[federation.ALL_STEPS, federation.ALL_STEPS, 0],
                        valid=[1, 1, 0])
    partial = run_round(alg, data, [0, 1, 2], chunk=1, steps=[federation.ALL_STEPS, federation.ALL_STEPS, per_epoch])
    full = run_round(alg, data, [0, 1, 2], chunk=1)
    np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(dropped.server.params)[0]),
                               np.asarray(jax.flatten_util.ravel_pytree(without.server.params)[0]), rtol=1e-6, atol=1e-7)
    assert float(dropped.metrics["reported_clients"]) == 2 and float(partial.metrics["reported_clients"]) == 3
    assert not _trees_equal(partial.server.params, dropped.server.params)
    assert not _trees_equal(partial.server.params, full.server.params)


def test_a_round_nobody_reports_leaves_the_server_as_it_was():
    data, _ = digits_client_data(num_clients=4)
    alg = small_fedpm()
    server = alg.server_init(jax.random.key(0))
    out = run_round(alg, data, [0, 1], chunk=2, valid=[0, 0], server=jax.tree.map(lambda a: a.copy(), server))
    assert _trees_equal(out.server, server)
    assert float(out.metrics["reported_clients"]) == 0
    assert all(np.isfinite(float(v)) for v in out.metrics.values())


def _cfg(**kw):
    return RunConfig(**{"num_clients": 20, "clients_per_round": 5, "batch_size": 10, "local_epochs": 2, **kw})


SIZES = np.full(20, 40)  # 4 steps an epoch, 8 in all


def test_cohort_sampling_without_replacement_keyed_by_seed_and_round():
    a = federation.sample_cohort(3, 5, 100, 30)
    assert len(set(a.tolist())) == 30 and a.min() >= 0 and a.max() < 100
    np.testing.assert_array_equal(a, federation.sample_cohort(3, 5, 100, 30))
    assert not np.array_equal(a, federation.sample_cohort(3, 6, 100, 30))
    assert not np.array_equal(a, federation.sample_cohort(4, 5, 100, 30))


def test_defaults_give_todays_cohorts_and_full_work():
    fed = federation.build(_cfg(), SIZES)
    for r in range(5):
        plan = fed.plan(r)
        np.testing.assert_array_equal(plan.clients, federation.sample_cohort(0, r, 20, 5))
        assert plan.steps is None and plan.valid is None and plan.fields == {}
    assert fed.uniform_sampling


def test_speeds_budgets_and_the_two_policies(tmp_path):
    trace = tmp_path / "speeds.csv"
    trace.write_text("client,speed\n" + "".join(f"{c},{1.0 if c % 2 else 0.5}\n" for c in range(20)))
    partial = federation.build(_cfg(local_work=f"csv:{trace}"), SIZES)
    assert partial.budget.tolist() == [4 if c % 2 == 0 else 8 for c in range(20)]  # half the speed, half the steps
    plan = partial.plan(3)
    slow = plan.clients % 2 == 0
    assert plan.steps[slow].tolist() == [4] * slow.sum() and (plan.steps[~slow] == federation.ALL_STEPS).all()
    assert plan.valid.tolist() == [1.0] * 5
    assert plan.fields == {"clients_dropped": 0, "clients_partial": int(slow.sum())}
    drop = federation.build(_cfg(local_work=f"csv:{trace}", straggler_policy="drop"), SIZES).plan(3)
    np.testing.assert_array_equal(drop.clients, plan.clients)
    assert drop.valid.tolist() == (~slow).astype(np.float32).tolist() and (drop.steps[slow] == 0).all()
    assert drop.fields == {"clients_dropped": int(slow.sum()), "clients_partial": 0}
    # A deadline twice as long lets the slow clients finish too.
    assert not federation.build(_cfg(local_work=f"csv:{trace}", round_deadline=2.0), SIZES).heterogeneous


def test_speed_distributions_are_per_client_and_keyed_by_seed():
    a = federation.client_speeds("uniform:0.25,1.0", 1000, seed=3)
    assert a.min() >= 0.25 and a.max() <= 1.0 and abs(a.mean() - 0.625) < 0.02
    np.testing.assert_array_equal(a, federation.client_speeds("uniform:0.25,1.0", 1000, seed=3))
    assert not np.array_equal(a, federation.client_speeds("uniform:0.25,1.0", 1000, seed=4))
    b = federation.client_speeds("lognormal:0,0.5", 20000, seed=0)
    assert abs(np.median(np.log(b))) < 0.02 and abs(np.log(b).std() - 0.5) < 0.02


def test_availability_samples_the_cohort_among_available_clients():
    fed = federation.build(_cfg(availability="bernoulli:0.5"), SIZES)
    counts = []
    for r in range(200):
        plan = fed.plan(r)
        draw = np.random.default_rng([0, r, 2]).random(20)
        available = np.flatnonzero(draw < 0.5)
        assert set(plan.clients) <= set(available) and len(plan.clients) == min(5, len(available))
        assert plan.fields["clients_available"] == len(available)
        counts.append(len(available))
    assert abs(np.mean(counts) - 10) < 0.5
    assert not fed.uniform_sampling
    diurnal = federation.availability("diurnal:24,0.1,0.9", 1000, seed=0)
    assert diurnal(0).min() >= 0.1 and diurnal(0).max() <= 0.9
    np.testing.assert_allclose(diurnal(5), diurnal(29))  # one period later
    assert not np.allclose(diurnal(5), diurnal(11))


def test_a_small_cohort_keeps_the_programs_shape():
    cohort = engine.make_cohort(np.array([3], np.int32), 2, collect=2, size=5)
    assert cohort.ids.shape == (6,) and cohort.valid.tolist() == [1, 0, 0, 0, 0, 0]
    assert cohort.collect.tolist() == [0, 2, 2, 2, 2, 2]  # one slot filled, the other empty


@pytest.mark.parametrize("settings, message", [
    (dict(local_work="uniform:0.25,0.5", straggler_policy="drop"), "--round_deadline=1: no client can finish"),
    (dict(local_work="uniform:0.01,0.1"), "no client finishes even one local step"),
    (dict(availability="bernoulli:0.2"), "leaves on average 4.0 of the 20 clients available"),
    (dict(availability="diurnal:10,0,0.3"), "fewer than --clients_per_round=5"),
    (dict(availability="sometimes"), "--availability='sometimes' is unknown"),
    (dict(local_work="uniform:1,0.5"), "needs 0 < LOW <= HIGH"),
    (dict(local_work="csv:/nonexistent.csv"), "--local_work: no such file"),
    (dict(availability="bernoulli:1.5"), "probability outside [0, 1]"),
])
def test_settings_that_leave_no_client_fail_with_one_message(settings, message):
    with pytest.raises(ValueError, match=None) as err:
        federation.build(_cfg(**settings), SIZES)
    assert message in str(err.value)


def test_round_deadline_must_be_positive():
    with pytest.raises(ValueError, match="--round_deadline must be > 0"):
        _cfg(round_deadline=0.0)
    with pytest.raises(ValueError, match="--straggler_policy='late' is unknown"):
        _cfg(straggler_policy="late")
