import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fedmask_jax import export, models
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
    server, n = outcome.server, outcome.experiment.num_params
    loaded = export.load_model(summary["final_model_file"])
    ds = digits()
    thr = outcome.experiment.architecture.build(masked=True).clone(mask_mode="threshold")
    expected = thr.apply({"params": server.scores, "frozen": server.frozen}, jnp.asarray(ds.x_test))
    np.testing.assert_array_equal(loaded.predict(ds.x_test), np.argmax(expected, -1))
    np.testing.assert_allclose(loaded.logits(ds.x_test), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loaded.mask_flat,
                                  (models.flat(fedpm_lib.theta(server)) > 0.5).astype(np.uint8))
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


FORGE = r'''
import json, resource, struct, sys, time, zlib
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a 10 GB allocation would fail loudly
from fedmask_jax import export

blob = open(sys.argv[1], "rb").read()
fixed = len(export.MAGIC) + 6
_, header_len = struct.unpack("<HI", blob[len(export.MAGIC):fixed])
good = json.loads(blob[fixed:fixed + header_len])
payload = blob[fixed + header_len:-4]

def forged(change):
    header = json.loads(json.dumps(good))
    change(header)
    raw = json.dumps(header).encode()
    body = export.MAGIC + struct.pack("<HI", export.VERSION, len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))  # a valid CRC: forged, not damaged

cases = {
    "mlp_hidden floats": lambda h: h["architecture"].update(mlp_hidden=[1e7, 1e7]),
    "mlp_hidden huge": lambda h: h["architecture"].update(mlp_hidden=[1000000, 1000000]),
    "num_params 2^34": lambda h: h.update(num_params=2**34),
    "input_shape huge": lambda h: h.update(input_shape=[100000, 100000, 3]),
    "unknown architecture key": lambda h: h["architecture"].update(depth=50),
    "non-integer seed": lambda h: h.update(seed=1.5),
    "ones above num_params": lambda h: h.update(ones=h["num_params"] + 1),
    "num_params off by one": lambda h: h.update(num_params=h["num_params"] - 1),
    "num_classes zero": lambda h: h["architecture"].update(num_classes=0),
}
out = {}
for name, change in cases.items():
    path = sys.argv[2] + "/forged.fmjx"
    open(path, "wb").write(forged(change))
    t = time.perf_counter()
    try:
        export.load_model(path)
        out[name] = ["loaded", 0]
    except Exception as e:
        out[name] = [type(e).__name__, time.perf_counter() - t, str(e)]
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_forged_headers_with_valid_crcs_fail_fast_without_allocating(thresholded_run, tmp_path):
    """A CRC is not authentication: headers rewritten with a recomputed CRC are refused field
    by field, in well under a second each, under a 4 GB address-space limit."""
    import subprocess
    import sys

    _, summary = thresholded_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", FORGE, summary["final_model_file"], str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, (kind, seconds, *message) in results.items():
        assert kind == "ModelFileError", (name, kind, message)
        assert seconds < 5, (name, seconds)
        assert "forged.fmjx" in message[0]
