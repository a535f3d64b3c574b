import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import export
from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.simulation import RunConfig, execute
from tests.helpers import digits

TINY = RunConfig(dataset="digits", model="mlp", mlp_hidden=(32,), num_clients=4,
                 clients_per_round=4, rounds=2, local_epochs=1, batch_size=32, verbose=False)


@pytest.fixture(scope="module")
def thresholded_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    outcome = execute(dataclasses.replace(TINY, workdir=workdir, method={"export_mask": "thresholded"}))
    return outcome, outcome.summary


@pytest.mark.slow
def test_round_trip_gives_identical_predictions(thresholded_run):
    outcome, summary = thresholded_run
    server, n = outcome.state.server, outcome.experiment.algorithm.num_params
    loaded = export.load_model(summary["final_model_file"])
    ds = digits()
    thr = outcome.experiment.architecture.build(masked=True).clone(mask_mode="threshold")
    expected = thr.apply({"params": server.scores, "frozen": server.frozen}, jnp.asarray(ds.x_test))
    np.testing.assert_array_equal(loaded.predict(ds.x_test), np.argmax(expected, -1))
    np.testing.assert_allclose(loaded.logits(ds.x_test), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loaded.mask_flat,
                                  (fedpm_lib.flat(fedpm_lib.theta(server)) > 0.5).astype(np.uint8))
    size = os.path.getsize(summary["final_model_file"])
    assert summary["final_model_file_bpp"] == pytest.approx(8 * size / n)
    # The coded mask is under one bit per entry; the JSON header is a fixed few hundred bytes.
    assert 32 * loaded.header["num_words"] / n <= 1.0 + 64 / n


@pytest.mark.slow
def test_sampled_mask_export_is_a_valid_model(tmp_path):
    summary = execute(dataclasses.replace(TINY, workdir=str(tmp_path))).summary
    loaded = export.load_model(summary["final_model_file"])
    assert loaded.header["mask_kind"] == "sampled"
    assert loaded.predict(digits().x_test[:5]).shape == (5,)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_damaged_file_fails_clearly(thresholded_run, tmp_path, damage):
    _, summary = thresholded_run
    blob = bytearray(open(summary["final_model_file"], "rb").read())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0x40
    elif damage == "magic":
        blob[:4] = b"JUNK"
    else:
        blob = bytearray()
    bad = tmp_path / "bad.fmjx"
    bad.write_bytes(bytes(blob))
    with pytest.raises(export.ModelFileError, match="bad.fmjx"):
        export.load_model(str(bad))


def test_export_rejects_unknown_mask_kind(tmp_path):
    with pytest.raises(ValueError, match="mask kind"):
        export.export_model(str(tmp_path / "m"), architecture={}, input_shape=(1,), seed=0,
                            mask_flat=np.zeros(3), mask_kind="median")
