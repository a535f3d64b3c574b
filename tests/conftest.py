import os

# Tests run on the CPU even where an accelerator is present, and without preallocating it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
