"""FedPM's host hooks on a real round: the coding check (in a thread and in worker processes)
and the faults it must catch."""

import jax
import numpy as np
import pytest

from fedmask_jax.algorithms import fedpm as fedpm_lib
from fedmask_jax.algorithms import fedpm_host
from fedmask_jax.algorithms.base import HostContext, RunFault
from tests.helpers import DIGITS_ARCH, digits_client_data, run_round, small_fedpm


@pytest.fixture(scope="module")
def collected_round():
    alg = small_fedpm()
    data, _ = digits_client_data(num_clients=4)
    server = alg.server_init(jax.random.key(0))
    ctx = HostContext(alg, fedpm_lib.FedPMConfig(), DIGITS_ARCH, seed=0, clients_per_round=3, workdir=None)
    theta = fedpm_host._flat_theta(server)
    out = run_round(alg, data, [0, 1, 3], chunk=1, epochs=1, collect=3, server=server)
    return ctx, theta, out


@pytest.mark.parametrize("workers", [1, 2])
def test_coding_check_measures_the_collected_masks(collected_round, workers):
    ctx, theta, out = collected_round
    hook = fedpm_host.UplinkCodingCheck(ctx, 3, workers=workers)
    try:
        assert ("worker processes" in hook.header()) == (workers > 1)
        fields = hook.after_round(0, out, theta).result(timeout=120)
    finally:
        hook.close()
    assert fields["verified_clients"] == 3
    ideal = float(out.metrics["uplink_bpp_coded_prior"])  # all three clients were collected
    assert ideal <= fields["uplink_bpp_measured_prior"] <= ideal * 1.001 + 64 / ctx.algorithm.num_params
    assert 0 <= fields["uplink_coding_overhead"] < 0.05  # 64 flush bits on ~1,300 bits of mask
    assert fields["uplink_bpp_measured_global"] >= float(out.metrics["uplink_bpp_coded_global"])


def test_coding_check_catches_a_message_that_is_not_what_the_round_measured(collected_round):
    ctx, theta, out = collected_round
    payload = np.asarray(out.collected.payload).copy()
    payload[1] ^= 0xFF  # every bit of client 2's message flipped after the round measured it
    bad = out._replace(collected=out.collected._replace(payload=payload))
    hook = fedpm_host.UplinkCodingCheck(ctx, 3, workers=1)
    try:
        with pytest.raises(RunFault, match="round 5: the round's prior-code length of a client's mask"):
            hook.after_round(4, bad, theta).result(timeout=120)
    finally:
        hook.close()


def test_coding_workers_leave_a_core_for_the_round(monkeypatch):
    monkeypatch.setattr(fedpm_host.os, "cpu_count", lambda: 16)
    assert fedpm_host.coding_workers(10) == 10 and fedpm_host.coding_workers(40) == 15
    monkeypatch.setattr(fedpm_host.os, "cpu_count", lambda: 2)
    assert fedpm_host.coding_workers(10) == 1


@pytest.mark.parametrize("method,kind", [("fedpm", "sampled"), ("fedmask", "thresholded"), ("klms", "sampled")])
def test_auto_export_writes_the_mask_each_method_sends(method, kind):
    from fedmask_jax.algorithms import registry
    config = registry.method_config(method)
    ctx = HostContext(None, config, DIGITS_ARCH, seed=0, clients_per_round=3, workdir=None)
    assert config.export_mask == "auto"
    assert fedpm_host.FinalModel(ctx).kind == kind
