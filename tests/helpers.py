"""Small real-data fixtures shared by the tests (scikit-learn's digits, no download)."""

import functools

import jax.numpy as jnp

from fedmask_jax import engine, models
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.data import datasets, splits


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
