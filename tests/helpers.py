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


def wait_for_checkpoint(workdir, proc, at_least=1, seconds=300):
    """Waits until a run started as ``proc`` has a complete checkpoint of round ``at_least`` or
    later in ``workdir``. Any such round counts: older checkpoints are deleted as new ones
    land, so a poll can miss the one of round ``at_least`` itself. A run that ends first or
    takes longer fails the test, and a run still going is killed (it may be set for 100,000
    rounds) before its output is read."""
    import os
    import time

    folder = os.path.join(workdir, "checkpoints")
    deadline = time.time() + seconds
    while True:
        steps = [int(d) for d in (os.listdir(folder) if os.path.isdir(folder) else ()) if d.isdigit()
                 and os.path.exists(os.path.join(folder, d, "integrity.json"))]
        if any(s >= at_least for s in steps):
            return
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=60)
            raise AssertionError(f"no checkpoint of round >= {at_least} in {folder} "
                                 f"(exit status {proc.returncode}): {err}")
        time.sleep(0.1)
