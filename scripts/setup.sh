#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: offline Fashion-MNIST from Debian's package,
# a virtual environment in .venv, and this package with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian package dataset-fashion-mnist (offline Fashion-MNIST)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: no apt-get; put the Fashion-MNIST .gz files in a folder and pass --archive_dir" >&2
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,bench]'
# oneDNN's convolutions behind JAX's FFI for XLA:CPU (fedmask_jax/kernels); where the
# extension cannot build, it says so and the models keep XLA's convolution.
.venv/bin/python -m fedmask_jax.kernels.build --quiet
echo "setup: ready (.venv)"
