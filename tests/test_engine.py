import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import engine, models
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.algorithms.base import Batch
from tests.helpers import digits, digits_client_data, run_round, small_fedpm


def _assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_padded_client_matches_unpadded_client():
    ds = digits()
    rows = np.arange(150)
    alone = engine.client_data_from_partition(ds.x_train, ds.y_train, [rows])
    # Same client 0, but a second, larger client forces padding of client 0's row and steps.
    padded = engine.client_data_from_partition(ds.x_train, ds.y_train, [rows, np.arange(150, 700)])
    assert padded.index.shape[1] > alone.index.shape[1]
    alg = small_fedpm()
    s1, _, m1, *_ = run_round(alg, alone, [0])
    s2, _, m2, *_ = run_round(alg, padded, [0])
    _assert_trees_close(s1.scores, s2.scores, rtol=0, atol=1e-6)
    for name in m1:
        assert float(m1[name]) == pytest.approx(float(m2[name]), rel=1e-6), name


def test_chunk_size_and_padding_clients_do_not_change_the_round():
    """Three clients in chunks of 1, 2 (padded to 4 with a dummy client of weight 0) and 3."""
    data, _ = digits_client_data(num_clients=4)
    alg = small_fedpm()
    results = [run_round(alg, data, [0, 1, 2], chunk=c) for c in (1, 2, 3)]
    for out in results[1:]:
        _assert_trees_close(results[0].server.scores, out.server.scores, rtol=1e-5, atol=1e-5)
        for name in out.metrics:
            assert float(out.metrics[name]) == pytest.approx(float(results[0].metrics[name]), rel=1e-5)


def test_persistent_optimizer_state_is_kept_only_for_sampled_clients():
    data, parts = digits_client_data(num_clients=4)
    alg = small_fedpm(persistent_client_optimizer=True)
    store = run_round(alg, data, [1, 3], chunk=2, epochs=1).store
    counts = np.asarray(store[0].count)
    steps = [-(-len(p) // 64) for p in parts]
    assert counts.tolist() == [0, steps[1], 0, steps[3]]
    # A fresh optimizer keeps nothing.
    assert run_round(small_fedpm(), data, [1, 3], chunk=2, epochs=1).store == ()


def test_round_reduces_training_loss():
    data, _ = digits_client_data(num_clients=4)
    alg = small_fedpm()
    cfg = engine.EngineConfig(batch_size=64, local_epochs=1, client_chunk_size=4)
    round_fn = engine.make_round_fn(alg, cfg)
    server, store = alg.server_init(jax.random.key(0)), ()
    cohort = engine.make_cohort(np.arange(4, dtype=np.int32), 4)
    losses = []
    for r in range(4):
        server, store, m, *_ = round_fn(server, store, data, cohort, jax.random.key(r))
        losses.append(float(m["train_loss"]))
    assert losses[-1] < 0.7 * losses[0]


def test_make_cohort_marks_padding_and_picks_collected_positions():
    cohort = engine.make_cohort(np.array([4, 7, 9], np.int32), 2)
    assert cohort.ids.tolist() == [4, 7, 9, 0] and cohort.valid.tolist() == [1, 1, 1, 0]
    assert cohort.collect.tolist() == [0, 0, 0, 0]  # no slots: every position is out of range
    picks = [engine.make_cohort(np.arange(10, dtype=np.int32), 4, 3, seed=0, round_index=r).collect
             for r in range(2)]
    for collect in picks:
        assert sorted(collect[:10][collect[:10] < 3].tolist()) == [0, 1, 2]  # each slot once
        assert (collect[10:] == 3).all()  # padding is never collected
    assert not np.array_equal(picks[0], picks[1])  # keyed by the round
    with pytest.raises(ValueError, match="cannot collect 4"):
        engine.make_cohort(np.arange(3, dtype=np.int32), 1, 4)


def test_auto_chunk_size():
    assert engine.auto_chunk_size(10, 2_000_000, conv=True, backend="cpu") == 1
    # CPU: clients whose working set (8 copies of the parameters) fits the cache, at least 2.
    cache = 32 * 2**20
    assert engine.auto_chunk_size(10, 266_610, conv=False, backend="cpu",
                                  memory_budget_bytes=cache) == 2
    assert engine.auto_chunk_size(100, 125_810, conv=False, backend="cpu",
                                  memory_budget_bytes=cache) == 5
    big = engine.auto_chunk_size(1000, 266_610, conv=False, backend="cpu")
    assert 2 <= big < 1000 and 1000 % big == 0
    assert engine.auto_chunk_size(1000, 266_610, conv=False, backend="gpu") == 500  # 8 GB
    assert engine.auto_chunk_size(8, 10_000_000, conv=False, backend="cpu") == 2


# Each value of each factor once, not crossed (an unvmapped chunk without client state, a
# vmapped one with it): each case compiles two round programs (docs/benchmarks.md, "The suite").
@pytest.mark.parametrize("chunk, persistent", [(1, False), (2, True)])
def test_both_loops_give_the_same_round(chunk, persistent):
    """Both strategies, an unvmapped or a vmapped chunk, without or with persistent client
    state, messages collected: compiled ahead of time, then run, the two loops agree."""
    data, _ = digits_client_data(num_clients=4)
    data = data._replace(sizes=data.sizes.at[1].set(90))  # unequal sizes: skipped steps
    alg = small_fedpm(persistent_client_optimizer=persistent)
    cfg = engine.EngineConfig(batch_size=64, local_epochs=2, client_chunk_size=chunk, collect=2)
    cohort = engine.make_cohort(np.array([0, 1, 3], np.int32), chunk, 2, seed=0, round_index=5)
    out = {}
    for strategy in engine.STRATEGIES:
        round_fn = engine.make_round_fn(alg, cfg, strategy)
        server, store = alg.server_init(jax.random.key(0)), engine.init_store(alg, 4)
        round_fn.compile(server, store, data, cohort, jax.random.key(3))
        out[strategy] = round_fn(server, store, data, cohort, jax.random.key(3))
    a, b = out["scan"], out["host_loop"]
    _assert_trees_close(a.server.scores, b.server.scores, rtol=1e-5, atol=1e-5)
    _assert_trees_close(a.store, b.store, rtol=1e-5, atol=1e-6)
    for name in a.metrics:
        assert float(a.metrics[name]) == pytest.approx(float(b.metrics[name]), rel=1e-5), name
    np.testing.assert_array_equal(a.collected.payload, b.collected.payload)
    _assert_trees_close(a.collected.metrics, b.collected.metrics, rtol=1e-5)


def test_collected_messages_are_the_chosen_clients_own():
    """Slot i holds the message and metrics of the client at the position ``collect`` maps to
    slot i: the same as that client's alone (a client's result ignores its cohort mates)."""
    data, _ = digits_client_data(num_clients=4)
    alg = small_fedpm()
    clients = np.array([0, 2, 3], np.int32)
    cohort = engine.make_cohort(clients, 2, 2, seed=1, round_index=0)
    cfg = engine.EngineConfig(batch_size=64, local_epochs=1, client_chunk_size=2, collect=2)
    server, store = alg.server_init(jax.random.key(0)), engine.init_store(alg, 4)
    out = engine.make_round_fn(alg, cfg)(server, store, data, cohort, jax.random.key(3))
    assert out.collected.payload.shape == (2, -(-alg.num_params // 8))
    for position in np.flatnonzero(cohort.collect < 2):
        slot = cohort.collect[position]
        alone = run_round(alg, data, [clients[position]], epochs=1, collect=1, key=jax.random.key(3))
        np.testing.assert_array_equal(out.collected.payload[slot], alone.collected.payload[0])
        for name, values in out.collected.metrics.items():
            assert float(values[slot]) == pytest.approx(float(alone.metrics[name]), rel=1e-6), name
        mask = np.unpackbits(np.asarray(out.collected.payload[slot]))[:alg.num_params]
        assert mask.mean() == pytest.approx(float(out.collected.metrics["mask_density"][slot]), rel=1e-6)


def test_auto_strategy():
    assert engine.auto_strategy(conv=True, backend="cpu") == "host_loop"
    assert engine.auto_strategy(conv=False, backend="cpu") == "scan"
    assert engine.auto_strategy(conv=True, backend="gpu") == "scan"


def _conv_grad_program(options):
    # Conv4's second layer at batch 8 (compiled, not run): small convs stay out of YNNPACK.
    x = jnp.ones((8, 28, 28, 64))
    w = jnp.ones((3, 3, 64, 64))

    def loss(w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    return jax.jit(jax.grad(loss), compiler_options=options).lower(w).compile().as_text()


def test_cpu_compiler_options_turn_off_ynn_fusions():
    options = engine.compiler_options(engine.EngineConfig(), backend="cpu")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert engine.compiler_options(engine.EngineConfig(cpu_ynn_fusions=True), backend="cpu") is None
    assert engine.compiler_options(engine.EngineConfig(), backend="gpu") is None
    # The option does what it says, and jaxlib's default is what it says it turns off.
    assert "__ynn_fusion" in _conv_grad_program(None)
    assert "__ynn_fusion" not in _conv_grad_program(options)


@pytest.mark.parametrize("strategy", engine.STRATEGIES)
def test_every_engine_program_gets_the_compiler_options(strategy, monkeypatch):
    """Each jitted program the engine makes (every stage of the host loop) gets the options."""
    seen = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        seen.append(kwargs.get("compiler_options", "missing"))
        return real_jit(fn, **kwargs)

    alg = small_fedpm()  # building the method compiles its init, which is not an engine program
    monkeypatch.setattr(jax, "jit", recording_jit)
    cfg = engine.EngineConfig(batch_size=64, local_epochs=1, client_chunk_size=1)
    engine.make_round_fn(alg, dataclasses.replace(cfg, collect=1), strategy)
    engine.make_eval_fn(alg, 64, engine.compiler_options(cfg))
    assert len(seen) == {"scan": 2, "host_loop": 8}[strategy]  # the round's programs and eval
    assert all(s == {"xla_cpu_experimental_ynn_fusion_type": ""} for s in seen), seen


@pytest.mark.slow
def test_ynn_fusions_do_not_change_a_conv_round():
    """Turning YNNPACK off changes kernels, not results: a Conv4 round agrees either way."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)  # generated 28x28 images
    y = rng.integers(0, 10, 64).astype(np.int32)
    data = engine.client_data_from_partition(x, y, [np.arange(0, 32), np.arange(32, 64)])
    model = models.build_model("conv4", 10, width=0.25)
    alg = fedpm_lib.fedpm(model, jnp.zeros((1, 28, 28, 1), jnp.uint8), fedpm_lib.FedPMConfig())
    # At this size jaxlib does hand the model's ops to YNNPACK, so the comparison means something.
    server = alg.server_init(jax.random.key(0))
    step = jax.jit(lambda s, x, y, k: alg.client_step(server, alg.client_init(server, ()),
                                                      Batch(x, y, jnp.ones(16)), k)[1])
    assert "__ynn_fusion" in step.lower(server, x[:16], y[:16], jax.random.key(1)).compile().as_text()
    cohort = engine.make_cohort(np.array([0, 1], np.int32), 1)
    out = []
    for ynn in (False, True):
        cfg = engine.EngineConfig(batch_size=16, local_epochs=1, client_chunk_size=1,
                                  cpu_ynn_fusions=ynn)
        round_fn = engine.make_round_fn(alg, cfg, "host_loop")
        store = engine.init_store(alg, 2)
        out.append(round_fn(server, store, data, cohort, jax.random.key(5)))
    (s1, _, m1, *_), (s2, _, m2, *_) = out
    for name in m1:
        assert float(m1[name]) == pytest.approx(float(m2[name]), rel=1e-4), name
    # Masks are sampled against scores trained in float32 by different kernels: nearly all
    # of the posterior counts agree exactly.
    a1, a2 = models.flat(s1.alpha), models.flat(s2.alpha)
    assert np.mean(a1 == a2) > 0.999
