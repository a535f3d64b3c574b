"""XLA:CPU's thread pool for virtual host devices: two multi-device programs in flight at once."""
import os
import subprocess
import sys

import pytest

from fedmask_jax import host_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Four programs with collectives dispatched back to back, many times: with a pool of exactly as
# many threads as devices this deadlocked within seconds on this 2-core machine (XLA then aborts
# at its collective timeout).
IN_FLIGHT = r"""
import jax, jax.numpy as jnp
import fedmask_jax  # before the backend starts
f = jax.pmap(lambda x: jax.lax.psum(jnp.sin(x) @ x.T, "i"), axis_name="i")
g = jax.pmap(lambda x: jax.lax.pmax(jnp.cos(x) @ x.T, "i"), axis_name="i")
x = jnp.ones((8, 256, 256))
for _ in range(300):
    a = f(x); b = g(x); c = f(b); d = g(a)
jax.block_until_ready((a, b, c, d))
print("done")
"""


def test_requested_devices_and_the_reserved_threads():
    env = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}
    assert host_devices.requested_host_devices(env) == 8
    host_devices.reserve_collective_threads(env)
    assert int(env["PJRT_NPROC"]) == max(os.cpu_count(), 4 * 8)
    assert host_devices.requested_host_devices({"JAX_NUM_CPU_DEVICES": "3"}) == 3
    one = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    host_devices.reserve_collective_threads(one)
    assert "PJRT_NPROC" not in one  # one device: the pool stays as XLA sizes it
    mine = {"JAX_NUM_CPU_DEVICES": "8", "PJRT_NPROC": "12"}
    host_devices.reserve_collective_threads(mine)
    assert mine["PJRT_NPROC"] == "12"  # the user's own setting wins


@pytest.mark.slow
def test_programs_with_collectives_in_flight_together_finish(devices_alone):
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", IN_FLIGHT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
