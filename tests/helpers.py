"""Small real-data fixtures shared by the tests (scikit-learn's digits, no download)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedmask_jax import engine, models
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.data import datasets, splits

DIGITS_ARCH = models.Architecture("mlp", 10, (8, 8, 1), mlp_hidden=(32,))


@functools.lru_cache(maxsize=None)
def digits():
    return datasets.load_digits()


def small_fedpm(**config):
    model = models.build_model("mlp", 10, mlp_hidden=(32,))
    return fedpm_lib.fedpm(model, jnp.zeros((1, 8, 8, 1), jnp.uint8), fedpm_lib.FedPMConfig(**config))


def digits_client_data(num_clients=4, seed=0, cap=None):
    ds = digits()
    parts = splits.partition(ds.y_train, num_clients, "iid", seed=seed, max_examples_per_client=cap)
    return engine.client_data_from_partition(ds.x_train, ds.y_train, parts), parts


def run_round(alg, data, clients, *, chunk=1, epochs=2, batch_size=64, strategy="scan", collect=0,
              key=None, server=None, store=None, steps=None, valid=None):
    """One round of ``alg`` on ``clients`` from a fresh server (or ``server``/``store``);
    ``steps``/``valid``: each client's step budget and weight (``engine.make_cohort``)."""
    cfg = engine.EngineConfig(batch_size=batch_size, local_epochs=epochs, client_chunk_size=chunk,
                              collect=collect)
    cohort = engine.make_cohort(np.asarray(clients, np.int32), chunk, collect, steps=steps, valid=valid)
    server = alg.server_init(jax.random.key(0)) if server is None else server
    store = engine.init_store(alg, data.index.shape[0]) if store is None else store
    key = jax.random.key(7) if key is None else key
    return engine.make_round_fn(alg, cfg, strategy)(server, store, data, cohort, key)
