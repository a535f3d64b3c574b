#!/usr/bin/env bash
# The GPU check, in one call: on a machine with one NVIDIA GPU whose Python has jax/jaxlib
# 0.11 (CUDA), flax, optax, chex, orbax, absl-py, torch (CUDA), numpy and matplotlib, and no
# package registry. Prepare DIR first, here, with scripts/device_prepare.sh.
#
#   bash scripts/device_check.sh OUT [DIR]    # DIR defaults to .device
#
# Runs the quickstart, then the benchmark cases mlp_w1_k100, conv4_w1_k10, conv4_w1_k100 and
# the 10,000-client case with the PyTorch reference on CUDA; writes into OUT (at most 8 files):
# env.txt, quickstart.log, quickstart_metrics.jsonl, quickstart_summary.json, distributed.log,
# benchmark.log, benchmark.json, benchmarks.md. About 7 minutes on an H100.
#
# Between them, the distributed step: the tiny digits run as two jax.distributed processes of
# two virtual CPU devices each (gloo over 127.0.0.1; CPU because there is one GPU) against one
# process with four, record by record; writes distributed.log. MODE=distributed runs it alone.
#
# MODE=sweep instead: the benchmark's sweep cases (8 runs x 10 clients, MLP and Conv4, in one
# program vs one at a time) and the quickstart swept over 8 seeds as one program and as one
# process per point; writes env.txt, benchmark.log, benchmark.json, benchmarks.md, sweep.log,
# sweep_vectorized.md, sweep_one_per_process.md. About 4 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: device_check.sh OUT [DIR]}"
DIR="${2:-.device}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/fedmask_site "$DIR"/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/fedmask_site:$PWD"
if ! "$PY" -c "import tensorflow_datasets, tensorboardX, constriction" 2>/dev/null; then
  echo "device_check: the image's protobuf is too old for the carried packages; installing $DIR/protobuf"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedmask_site "$DIR"/protobuf/*.whl || exit 1
  "$PY" -c "import tensorflow_datasets, tensorboardX, constriction" || exit 1
fi
WORK=/tmp/fedmask_device
rm -rf "$WORK" && mkdir -p "$WORK"

distributed_step() {  # 2 processes x 2 CPU devices vs 1 process x 4, the same records
  timeout 360 "$PY" -m experiments.multiprocess --processes=2 --cpu_devices=2 --compare --timeout_s=170 \
    -- --flagfile=experiments/configs/distributed_tiny.flags --workdir="$WORK/distributed" 2>&1 \
    | grep -v '^\[Gloo\]' | tee "$OUT/distributed.log"
  echo "distributed step: exit ${PIPESTATUS[0]}" | tee -a "$OUT/distributed.log"
}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import jax, jaxlib, flax, optax, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${MODE:-check}" = distributed ]; then
  distributed_step
  ls -la "$OUT"
  exit 0
fi

if [ "${MODE:-check}" = sweep ]; then
  sweep() {  # the quickstart over SEEDS, --vectorize or --novectorize
    local start=$EPOCHREALTIME
    timeout 240 "$PY" -m experiments.sweep --flagfile=experiments/configs/quickstart.flags \
      --sweep="seed=${SEEDS:-0,1,2,3,4,5,6,7}" --sweep_dir="$WORK/sweep_$1" --$1 ${ROUNDS:+--rounds=$ROUNDS} \
      --archive_dir="$DIR/fashion-mnist" --data_dir="$WORK/tfds" --download=false --notensorboard \
      > "$WORK/sweep_$1.out" 2>&1
    local rc=$?
    echo "sweep --$1: exit $rc, $("$PY" -c "print(round($EPOCHREALTIME - $start, 1))") s wall" | tee -a "$OUT/sweep.log"
    tail -12 "$WORK/sweep_$1.out" >> "$OUT/sweep.log"
  }
  sweep vectorize  # also prepares Fashion-MNIST in $WORK/tfds for the benchmark
  cp "$WORK/sweep_vectorize/sweep.md" "$OUT/sweep_vectorized.md" 2>/dev/null
  timeout 200 "$PY" -m experiments.benchmark --cases="${CASES:-mlp_w1_k10_r8,conv4_w1_k10_r8}" --notorch \
    --examples_per_client=128 --local_epochs=3 --batch_size=128 --timed_rounds=3 --min_timed_seconds=3 \
    --data_dir="$WORK/tfds" --workdir="$WORK/benchmark" --docs="$OUT/benchmarks.md" 2>&1 | tee "$OUT/benchmark.log"
  cp "$WORK/benchmark/benchmark.json" "$OUT/benchmark.json" 2>/dev/null
  sweep novectorize
  cp "$WORK/sweep_novectorize/sweep.md" "$OUT/sweep_one_per_process.md" 2>/dev/null
  ls -la "$OUT"
  exit 0
fi

timeout 150 "$PY" -m experiments.run --flagfile=experiments/configs/quickstart.flags \
  --archive_dir="$DIR/fashion-mnist" --data_dir="$WORK/tfds" --download=false \
  --workdir="$WORK/quickstart" 2>&1 | tee "$OUT/quickstart.log"
cp "$WORK/quickstart/metrics.jsonl" "$OUT/quickstart_metrics.jsonl" 2>/dev/null
cp "$WORK/quickstart/summary.json" "$OUT/quickstart_summary.json" 2>/dev/null

distributed_step

# CASES and TORCH override the cases and the reference's device (a CPU dry run: CASES=mlp_w05_k10 TORCH=--notorch).
timeout 380 "$PY" -m experiments.benchmark \
  --cases="${CASES:-mlp_w1_k100,conv4_w1_k10,conv4_w1_k100,mlp_w1_k1000_n10000}" ${TORCH:---torch_device=cuda} \
  --examples_per_client=128 --local_epochs=3 --batch_size=128 --timed_rounds=3 \
  --min_timed_seconds=4 --torch_max_clients=100 \
  --data_dir="$WORK/tfds" --workdir="$WORK/benchmark" --docs="$OUT/benchmarks.md" \
  2>&1 | tee "$OUT/benchmark.log"
cp "$WORK/benchmark/benchmark.json" "$OUT/benchmark.json" 2>/dev/null
ls -la "$OUT"
