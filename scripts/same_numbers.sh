#!/usr/bin/env bash
# Does a change change a number? Runs the same four jobs at two commits, one after the other in
# one sitting, and compares every non-timing value of their records (metrics.jsonl) and the
# quickstart's model file:
#   the quickstart (20 rounds); FedAvg and KLMS on the quickstart's setting (5 rounds);
#   a 4-seed sweep on digits (5 rounds).
# Usage: bash scripts/same_numbers.sh OLD_COMMIT [NEW_COMMIT (default: HEAD)] [OUT (default:
# /tmp/same_numbers)]. Each commit is checked out into a worktree under OUT, with this
# checkout's .venv and convolution kernel. Exit status 0 when every value is equal, 1 if not.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1
NEW=${2:-HEAD}
OUT=${3:-/tmp/same_numbers}
ROOT=$PWD
rm -rf "$OUT"
mkdir -p "$OUT"
for tag in old new; do
  rev=$OLD
  [[ $tag == new ]] && rev=$NEW
  tree=$OUT/tree_$tag
  git worktree add --detach "$tree" "$rev" > /dev/null
  ln -s "$ROOT/.venv" "$tree/.venv"
  cp "$ROOT"/fedmask_jax/kernels/_onednn_conv.so "$tree/fedmask_jax/kernels/" 2> /dev/null || true
  runs=$OUT/$tag
  mkdir -p "$runs"
  echo "same_numbers: $tag = $(git rev-parse --short "$rev") ..."
  (
    cd "$tree"
    export PYTHONPATH=$tree JAX_PLATFORMS=cpu
    run() { local name=$1; shift; .venv/bin/python "$@" > "$runs/$name.log" 2>&1 || { echo "same_numbers: $tag $name failed ($runs/$name.log)"; exit 2; }; }
    Q=(--flagfile=experiments/configs/quickstart.flags --notensorboard)
    run quickstart -m experiments.run "${Q[@]}" --workdir="$runs/quickstart"
    run fedavg -m experiments.run "${Q[@]}" --algorithm=fedavg --rounds=5 --workdir="$runs/fedavg"
    run klms -m experiments.run "${Q[@]}" --algorithm=klms --rounds=5 --workdir="$runs/klms"
    run sweep -m experiments.sweep --dataset=digits --mlp_hidden=32 --num_clients=6 --clients_per_round=4 \
      --rounds=5 --local_epochs=1 --batch_size=32 --notensorboard --sweep=seed=0,1,2,3 --sweep_dir="$runs/sweep"
  )
  git worktree remove --force "$tree"
done
"$ROOT/.venv/bin/python" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
TIMING = ("time", "elapsed")  # wall, round, eval, coding and compile times, seconds elapsed


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


jobs = ["quickstart", "fedavg", "klms"] + sorted(
    f"sweep/{p}" for p in os.listdir(os.path.join(out, "old", "sweep")) if p.startswith("seed="))
same = True
for job in jobs:
    a, b = (records(os.path.join(out, t, job, "metrics.jsonl")) for t in ("old", "new"))
    equal = total = 0
    differ = [] if len(a) == len(b) else [f"{len(a)} rounds vs {len(b)}"]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if any(t in key for t in TIMING) and not key.startswith("sim_"):  # sim_: the simulated clock
                continue
            total += 1
            if rb.get(key) == value:
                equal += 1
            else:
                differ.append(f"round {ra['round']} {key}: {value} vs {rb.get(key)}")
        new = sorted(set(rb) - set(ra))
        if new:
            differ.append(f"round {rb['round']}: new fields {new}")
    print(f"{job}: {equal} of {total} values equal" + "".join(f"\n  {d}" for d in differ[:10]))
    same &= not differ
model = [open(os.path.join(out, t, "quickstart", "model.fmjx"), "rb").read() for t in ("old", "new")]
print("quickstart model.fmjx:", "identical" if model[0] == model[1] else "DIFFERS")
same &= model[0] == model[1]
sys.exit(0 if same else 1)
EOF
