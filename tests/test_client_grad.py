"""A vmapped chunk's gradients taken as the gradient of its summed objective
(``client_grad="summed"``) give the round that each client's own gradient gives."""

import jax
import numpy as np
import pytest

from fedmask_jax import engine, experiment, models
from fedmask_jax.algorithms import registry
from fedmask_jax.algorithms.base import Batch, gradient_step
from fedmask_jax.engine import program
from fedmask_jax.run_config import RunConfig
from tests.helpers import digits_client_data, small_fedpm

TINY_CONV = models.Architecture("conv4", 10, (8, 8, 1), width=0.125)  # digits: 8x8 images


def _round(alg, data, chunk, client_grad, clients=(0, 1, 2)):
    cfg = engine.EngineConfig(batch_size=32, local_epochs=1, client_chunk_size=chunk, client_grad=client_grad)
    cohort = engine.make_cohort(np.asarray(clients, np.int32), chunk)  # 3 clients: chunk 2 pads
    server, store = alg.server_init(jax.random.key(0)), engine.init_store(alg, data.index.shape[0])
    return engine.make_round_fn(alg, cfg, "scan")(server, store, data, cohort, jax.random.key(3))


def _assert_same_round(a, b, rtol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6),
                 jax.tree.map(_plain, a.server), jax.tree.map(_plain, b.server))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6),
                 a.store, b.store)
    assert set(a.metrics) == set(b.metrics)
    for name in a.metrics:
        assert float(a.metrics[name]) == pytest.approx(float(b.metrics[name]), rel=rtol, abs=1e-7), name


def _plain(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


@pytest.mark.slow  # conv rounds: XLA:CPU compiles grouped convs slowly
@pytest.mark.parametrize("method,chunk", [("fedpm", 2), ("fedavg", 2)])  # 3 clients: a padding client
def test_summed_gradient_gives_the_same_conv_round(method, chunk):
    data, _ = digits_client_data(num_clients=4, cap=64)
    spec = registry.spec(method)
    config = spec.config() if method == "fedavg" else spec.config(persistent_client_optimizer=True)
    alg = spec.build(TINY_CONV, config)
    assert alg.separable_step
    per_client, summed = (_round(alg, data, chunk, g) for g in engine.CLIENT_GRADS)
    _assert_same_round(per_client, summed, rtol=1e-5)


def test_summed_gradient_gives_the_same_mlp_round():
    data, _ = digits_client_data(num_clients=4)
    alg = small_fedpm()
    _assert_same_round(*(_round(alg, data, 2, g) for g in engine.CLIENT_GRADS), rtol=1e-5)


def test_a_chunk_of_one_ignores_the_setting():
    """Unvmapped clients take their own gradients either way: the same program."""
    alg = small_fedpm()
    stages = [program._Stages(alg, engine.EngineConfig(client_chunk_size=1, client_grad=g), None)
              for g in engine.CLIENT_GRADS]
    assert not any(st.summed for st in stages)


def test_client_step_is_the_gradient_step_of_its_halves():
    data, _ = digits_client_data(num_clients=1)
    alg = small_fedpm()
    server = alg.server_init(jax.random.key(0))
    state = alg.client_init(server, ())
    rows = np.arange(16)
    batch = Batch(data.x[rows], data.y[rows], np.ones(16, np.float32))
    step = gradient_step(alg.client_params, alg.client_loss, alg.client_apply)
    a, b = alg.client_step(server, state, batch, jax.random.key(1)), step(server, state, batch, jax.random.key(1))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_summed_needs_a_separable_step_and_a_known_name():
    alg = small_fedpm()
    opaque = alg._replace(client_params=None, client_loss=None, client_apply=None)
    assert alg.separable_step and not opaque.separable_step
    with pytest.raises(ValueError, match="client_loss"):
        engine.make_round_fn(opaque, engine.EngineConfig(client_chunk_size=2, client_grad="summed"))
    engine.make_round_fn(opaque, engine.EngineConfig(client_chunk_size=2))  # per_client: fine
    with pytest.raises(ValueError, match="unknown client_grad"):
        engine.make_round_fn(alg, engine.EngineConfig(client_chunk_size=2, client_grad="mean"))


def test_auto_client_grad():
    assert engine.auto_client_grad(conv=True, chunk=10, backend="gpu") == "summed"
    for backend in ("cpu", "gpu", "tpu"):
        assert engine.auto_client_grad(conv=True, chunk=1, backend=backend) == "per_client"
        assert engine.auto_client_grad(conv=False, chunk=10, backend=backend) == "per_client"
    # XLA:CPU runs the summed form's batch-grouped filter gradient slower; TPU: not measured.
    assert engine.auto_client_grad(conv=True, chunk=10, backend="cpu") == "per_client"
    assert engine.auto_client_grad(conv=True, chunk=10, backend="tpu") == "per_client"


@pytest.mark.parametrize("model,chunk,flag,backend,expected", [
    ("conv4", 2, "auto", "gpu", "summed"), ("conv4", 2, "auto", "cpu", "per_client"),
    ("conv4", 1, "auto", "gpu", "per_client"), ("mlp", 2, "auto", "gpu", "per_client"),
    ("conv4", 2, "per_client", "gpu", "per_client"), ("mlp", 2, "summed", "cpu", "summed")])
def test_build_resolves_client_grad(model, chunk, flag, backend, expected, monkeypatch):
    """The run's --client_grad reaches the engine; auto is resolved once the chunk and the
    backend are known (the backend as ``experiment.build`` sees it, faked for ``gpu``)."""
    monkeypatch.setattr(experiment.jax, "default_backend", lambda: backend)
    cfg = RunConfig(dataset="digits", model=model, width=0.125, mlp_hidden=(32,), num_clients=4,
                    clients_per_round=4, batch_size=16, client_chunk_size=chunk, strategy="scan",
                    client_grad=flag, verbose=False, tensorboard=False, plots=False, method={"coded_uplink": False})
    exp = experiment.build(cfg)
    assert exp.engine_config.client_grad == expected
