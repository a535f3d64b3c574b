#!/usr/bin/env bash
# Prepares what scripts/device_check.sh needs on a GPU machine that reaches no package
# registry: Python 3.12 x86-64 wheels of the packages its image lacks, and the four
# Fashion-MNIST archives. Run it here (registry access), from the repository root:
#
#   bash scripts/device_prepare.sh [DIR]     # DIR defaults to .device (git-ignored)
#
# The image already has jax/jaxlib 0.11 (CUDA), flax, optax, chex, orbax-checkpoint, absl-py,
# numpy, matplotlib, torch (CUDA), etils, protobuf, psutil, pyarrow, requests, tqdm, wrapt,
# scikit-learn. Everything in DIR must stay under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.device}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python  # pins the suite's versions
grep -qx "/${DIR#./}/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/${DIR#./}/" >> .git/info/exclude; }
rm -rf "$DIR/wheels"
mkdir -p "$DIR/wheels" "$DIR/fashion-mnist"

# name==version as installed here (the versions the suite ran against), else the latest.
WHEELS=(constriction tensorboardX tensorflow-datasets array_record importlib_resources dm-tree
        immutabledict simple_parsing docstring-parser tensorflow-metadata googleapis-common-protos
        termcolor toml promise six)  # six: promise imports it, and the image need not have it
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform any)
for name in "${WHEELS[@]}"; do
  spec=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}' || true)
  spec="$name${spec:+==$spec}"
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$DIR/wheels" "$spec" 2>/dev/null; then
    # No wheel published (a pure-Python sdist): build one; it installs on any Python 3.
    "$PY" -m pip wheel -q --no-deps -w "$DIR/wheels" "$spec"
  fi
done

# protobuf apart: installed there only if the image's own is too old for the generated code
# of tensorflow-metadata / googleapis-common-protos (device_check.sh tries without it first).
rm -rf "$DIR/protobuf" && mkdir -p "$DIR/protobuf"
spec=$("$PY" -m pip show protobuf 2>/dev/null | awk '/^Version:/{print $2}' || true)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux_2_17_x86_64 -d "$DIR/protobuf" "protobuf${spec:+==$spec}"

SRC=/usr/share/datasets/fashion-mnist
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  cp "$SRC/$f" "$DIR/fashion-mnist/$f"
done
du -sh "$DIR"
ls "$DIR/wheels"
