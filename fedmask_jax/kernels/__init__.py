"""Native kernels behind JAX's FFI (built on the host by ``python -m fedmask_jax.kernels.build``)."""
