#!/usr/bin/env bash
# The GPU check, in one call: on a machine with one NVIDIA GPU whose Python has jax/jaxlib
# 0.11 (CUDA), flax, optax, chex, orbax, absl-py, torch (CUDA), numpy and matplotlib, and no
# package registry. Prepare DIR first, here, with scripts/device_prepare.sh.
#
#   bash scripts/device_check.sh OUT [DIR]    # DIR defaults to .device
#
# Runs, in this order, writing into OUT (at most 11 files):
#   1. the quickstart (quickstart.log, quickstart_metrics.jsonl, quickstart_summary.json);
#   2. the benchmark, PyTorch reference on CUDA: mlp_w1_k100, conv4_w1_k10, conv4_w1_k100, its
#      bf16 twin conv4_w1_k100_bf16 (--conv_precision=bf16; the reference not timed again),
#      and Conv6 on generated 32x32x3 data, conv6_w1_k10 and conv6_w1_k100 (benchmark.log,
#      benchmark.json, benchmarks.md); each row records the round's convolutions by kind and
#      element types (did XLA keep the bf16 ones in bf16?);
#   3. experiments.bench_conv --clients=10 and --clients=100 on Conv4's layers: the
#      client-batched lowerings, each checked against the host loop, then timed (bench_conv.log,
#      bench_conv_k10.json, bench_conv_k100.json);
#   4. the distributed step: the tiny digits run as two jax.distributed processes of two
#      virtual CPU devices each (gloo over 127.0.0.1; CPU because there is one GPU) against one
#      process with four, record by record (distributed.log). MODE=distributed runs it alone.
# MODE=compare runs issue 22's Conv4 comparisons instead (see that block below); MODE=sweep the
# sweep cases.
# plus env.txt. Each step prints its wall time. Estimated 8 minutes on an H200, from the
# 2026-11-27 run's figures (quickstart 53 s; compiles 11-31 s a case): quickstart ~1 min,
# benchmark ~4.5 min, bench_conv ~1.5 min, distributed ~1 min. The most wanted figures come first.
#
# Environment, for a dry run on a CPU (BUILD.md, "On a GPU machine"): PYTHON; ROUNDS
# (quickstart rounds, default the flagfile's 20); CASES and TORCH (benchmark cases, default above,
# and --torch_device=cuda; e.g. TORCH=--notorch); EXAMPLES (examples per client, default 128);
# CONV_CLIENTS (bench_conv's K values, default "10 100"); CONV_BATCH (its batch, default 128);
# CONV_KINDS (its lowerings, default all but unrolled: 100 clients' convs unrolled in one
# program are a long compile for a form no strategy uses); for MODE=compare, COMPARE_EXTRA and
# PAPER_EXTRA (flags added to the CPU-scale and the paper-scale comparison, e.g. --rounds=1
# --max_examples_per_client=64), COMPARE_LIMIT_S and PAPER_LIMIT_S.
#
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

if [ "${MODE:-check}" = compare ]; then
  # Issue 22: the CPU-scale Conv4 comparison (compare_fmnist_conv4_cpu.flags, 27 runs of 40
  # rounds), then the paper-scale one (compare_fmnist_conv4.flags) in the time left. Each gets a
  # wall-time limit (COMPARE_LIMIT_S, PAPER_LIMIT_S); what it finished comes back as
  # OUT/<name>.tar.gz (each run's config.json, metrics.jsonl and summary.json, the tables and
  # plots) with OUT/<name>.log. A comparison resumes: records carried in DIR/compare_records/<name>
  # (unpack an earlier call's archive there) are not run again. Seeds and the second setting of
  # a method reuse its compiled programs through JAX's persistent cache.
  export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"
  compare() {  # NAME FLAGFILE LIMIT_S [EXTRA FLAGS...]
    local start=$EPOCHREALTIME
    mkdir -p "$WORK/$1"
    [ -d "$DIR/compare_records/$1" ] && cp -r "$DIR/compare_records/$1/." "$WORK/$1/"
    timeout --signal=TERM --kill-after=20 "$3" "$PY" -m experiments.compare --flagfile="$2" \
      --compare_dir="$WORK/$1" --archive_dir="$DIR/fashion-mnist" --data_dir="$WORK/tfds" \
      --download=false --notensorboard "${@:4}" > "$OUT/$1.log" 2>&1
    local rc=$?
    (cd "$WORK" && find "$1" -type f \( -name config.json -o -name metrics.jsonl -o -name summary.json \
      -o -name 'compare*' \) -print0 | tar -czf "$OUT/$1.tar.gz" --null -T -)
    echo "compare $1: exit $rc, $(find "$WORK/$1" -name summary.json | wc -l) runs finished," \
      "$("$PY" -c "print(round($EPOCHREALTIME - $start, 1))") s wall" | tee -a "$OUT/env.txt"
  }
  compare compare_fmnist_conv4_cpu experiments/configs/compare_fmnist_conv4_cpu.flags "${COMPARE_LIMIT_S:-480}" \
    ${COMPARE_EXTRA:-}
  compare compare_fmnist_conv4 experiments/configs/compare_fmnist_conv4.flags "${PAPER_LIMIT_S:-60}" ${PAPER_EXTRA:-}
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

step() {  # NAME: prints the wall time of the step that just ended
  echo "device_check: $1 took $("$PY" -c "print(round($EPOCHREALTIME - $STEP_START, 1))") s" | tee -a "$OUT/env.txt"
  STEP_START=$EPOCHREALTIME
}
STEP_START=$EPOCHREALTIME

timeout 150 "$PY" -m experiments.run --flagfile=experiments/configs/quickstart.flags ${ROUNDS:+--rounds=$ROUNDS} \
  --archive_dir="$DIR/fashion-mnist" --data_dir="$WORK/tfds" --download=false \
  --workdir="$WORK/quickstart" 2>&1 | tee "$OUT/quickstart.log"
cp "$WORK/quickstart/metrics.jsonl" "$OUT/quickstart_metrics.jsonl" 2>/dev/null
cp "$WORK/quickstart/summary.json" "$OUT/quickstart_summary.json" 2>/dev/null
step quickstart

# The quickstart prepared Fashion-MNIST in $WORK/tfds; conv6 trains on generated images.
timeout 420 "$PY" -m experiments.benchmark \
  --cases="${CASES:-mlp_w1_k100,conv4_w1_k10,conv4_w1_k100,conv4_w1_k100_bf16,conv6_w1_k10,conv6_w1_k100}" \
  ${TORCH:---torch_device=cuda} --examples_per_client="${EXAMPLES:-128}" --local_epochs=3 --batch_size=128 \
  --timed_rounds=3 --min_timed_seconds=4 --torch_max_clients=100 \
  --data_dir="$WORK/tfds" --workdir="$WORK/benchmark" --docs="$OUT/benchmarks.md" \
  2>&1 | tee "$OUT/benchmark.log"
cp "$WORK/benchmark/benchmark.json" "$OUT/benchmark.json" 2>/dev/null
step benchmark

: > "$OUT/bench_conv.log"
for k in ${CONV_CLIENTS:-10 100}; do
  timeout 200 "$PY" -m experiments.bench_conv --clients="$k" --batch="${CONV_BATCH:-128}" \
    --kinds="${CONV_KINDS:-vmap_grad,summed_grad,map_dense,host_loop,im2col,shared_w_bound}" \
    --out="$OUT/bench_conv_k$k.json" 2>&1 | tee -a "$OUT/bench_conv.log"
  echo "bench_conv --clients=$k: exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_conv.log"
done
step bench_conv

distributed_step
step distributed
ls -la "$OUT"
