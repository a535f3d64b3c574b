#!/usr/bin/env bash
# The CPU Conv4 comparison of issue 22, end to end and resumable:
#   1. tune fedpm, fedavg, ef_signsgd and drive on the CNN (experiments.sweep, 3 values each,
#      10 rounds, 10% of the training set held out for validation);
#   2. pick each value by a rule fixed beforehand (experiments/select_tuned.py) and write it into
#      experiments/configs/methods_conv4_cpu/<method>.flags; a best value at an end of the grid
#      widens the grid by one step that way and the sweep runs again (at most twice);
#   3. the comparison (experiments/configs/compare_fmnist_conv4_cpu.flags) in three parts, each
#      ending with a finished table: (a) every method once, IID; (b) the non-IID setting;
#      (c) the other seeds; then the plain comparison command once more, which must find every
#      run done and only rebuild the tables.
# Every step skips the work already finished, so re-running the script (say, in the next
# session) continues where it stopped. A session's machine does not outlive it, so each finished
# run's record (config.json, metrics.jsonl, summary.json) is also copied into $RESULTS, which
# git tracks: commit it, and the next session's start copies it back into runs/ (a run that was
# interrupted starts again; its checkpoints stay in runs/, which git ignores). A method whose
# flagfile in experiments/configs/methods_conv4_cpu is already tuned is not tuned again
# (RETUNE=1 does). Each step's start, end, exit status, wall seconds and the
# CPU seconds of its processes go to $TIMES (and to stdout). Meant to run in the background:
#   setsid nice -n 19 bash scripts/conv4_comparison.sh > runs/conv4_comparison.log 2>&1 &
# CONV4_DRY_RUN=1: the same pipeline with 1 round, 128 images per client and one extra seed, in
# /tmp/conv4_dry (a scratch copy of the method flagfiles there), to check it end to end.
# The whole script is one function, read by bash before it runs, so editing this file while a
# pipeline runs does not change the running one (use the edit at the next start).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SETTING=experiments/configs/fmnist_conv4_cpu.flags
COMPARE=experiments/configs/compare_fmnist_conv4_cpu.flags
TUNE_ROUNDS=10
VALIDATION=0.1
if [[ "${CONV4_DRY_RUN:-0}" == 1 ]]; then
  SCRATCH=${CONV4_DRY_DIR:-/tmp/conv4_dry}
  mkdir -p "$SCRATCH"
  rm -rf "$SCRATCH/methods_conv4_cpu"
  cp -r experiments/configs/methods_conv4_cpu "$SCRATCH/methods_conv4_cpu"
  METHODS_DIR=$SCRATCH/methods_conv4_cpu
  TUNE_DIR=$SCRATCH/tune
  COMPARE_DIR=$SCRATCH/compare
  RESULTS=$SCRATCH/results
  TIMES=$SCRATCH/times.log
  SMALL=(--rounds=1 --max_examples_per_client=128)
  RETUNE=${RETUNE:-1}
  COMPARE_EXTRA=(--method_configs="$METHODS_DIR" --compare_dir="$COMPARE_DIR" --finished_runs= --seeds=1)
else
  METHODS_DIR=experiments/configs/methods_conv4_cpu
  TUNE_DIR=runs/tune_conv4_cpu
  COMPARE_DIR=runs/compare_fmnist_conv4_cpu
  RESULTS=results/conv4_cpu
  TIMES=runs/conv4_comparison_times.log
  SMALL=()
  COMPARE_EXTRA=()
fi
mkdir -p "$(dirname "$TIMES")"

note() { echo "$(date -Is) $*" | tee -a "$TIMES"; }

# The records of finished runs, between runs/ (this machine) and $RESULTS (tracked by git):
# keep = runs/ -> $RESULTS, bring = $RESULTS -> runs/. Only a folder with a summary.json is a
# finished run; bring never overwrites one that runs/ already has.
RECORD=(config.json metrics.jsonl summary.json)
records() {
  local way=$1 from to dir rel
  for base in "$TUNE_DIR" "$COMPARE_DIR"; do
    if [[ $way == keep ]]; then from=$base to=$RESULTS/${base##*/}; else from=$RESULTS/${base##*/} to=$base; fi
    [[ -d $from ]] || continue
    while IFS= read -r dir; do
      rel=${dir#"$from"/}
      [[ $way == bring && -f $to/$rel/summary.json ]] && continue
      mkdir -p "$to/$rel"
      for f in "${RECORD[@]}"; do [[ -f $dir/$f ]] && cp -p "$dir/$f" "$to/$rel/$f"; done
    done < <(find "$from" -name summary.json -printf '%h\n' | sort)
  done
  [[ $way == keep ]] && mkdir -p "$RESULTS" && cp -p "$TIMES" "$RESULTS/times.log"
  [[ $way == bring && ! -f $TIMES && -f $RESULTS/times.log ]] && cp -p "$RESULTS/times.log" "$TIMES"
  return 0
}

# step NAME CMD...: runs CMD, logging its exit status, wall time and CPU time (its processes',
# user + system, children included); returns CMD's exit status.
CURRENT=none
T0=$(date +%s)
step() {
  local name=$1; shift
  local tf t0 rc
  tf=$(mktemp)
  note "start $name: $*"
  t0=$(date +%s)
  CURRENT=$name T0=$t0
  TIMEFORMAT='%R %U %S'
  { time "$@" 2>&3; } 3>&2 2>"$tf"
  rc=$?
  read -r real user sys < <(tail -n 1 "$tf")
  rm -f "$tf"
  note "end $name rc=$rc wall_s=$(( $(date +%s) - t0 )) cpu_user_s=$user cpu_sys_s=$sys"
  CURRENT=none
  records keep
  return $rc
}
# A stopped session (SIGTERM, SIGINT, SIGHUP) logs how long the step it interrupted had run;
# the finished runs' own times stay in their summary.json (total_time_s).
interrupted() {
  note "interrupted by SIG$1 during $CURRENT after wall_s=$(( $(date +%s) - T0 ))"
  records keep
  exit 143
}
trap 'interrupted TERM' TERM
trap 'interrupted INT' INT
trap 'interrupted HUP' HUP

main() {
  records bring
  note "session: pid $$ pgid $(ps -o pgid= $$ | tr -d ' ') nice $(ps -o ni= $$ | tr -d ' ')" \
       "HEAD $(git rev-parse --short HEAD) local changes: $(git status --short -- fedmask_jax experiments | wc -l) files" \
       "dry_run=${CONV4_DRY_RUN:-0}"

  # 1-2. Tuning and selection. method:parameter:values, 1/3x, 1x and 3x each MLP-tuned value
  # (fedavg: its server learning rate, as the issue asks).
  TUNE=(fedpm:client_lr:0.03,0.1,0.3 fedavg:server_lr:0.3,1.0,3.0
        ef_signsgd:client_lr:0.03,0.1,0.3 drive:client_lr:0.03,0.1,0.3)
  failed=0
  for spec in "${TUNE[@]}"; do
    IFS=: read -r method param values <<< "$spec"
    if [[ ${RETUNE:-0} != 1 && -f $METHODS_DIR/$method.flags ]] && ! grep -q "NOT YET TUNED" "$METHODS_DIR/$method.flags"; then
      note "tune_$method: already tuned ($METHODS_DIR/$method.flags); RETUNE=1 tunes again"
      continue
    fi
    # A best value at an end of the grid: the grid grows by one step that way and the sweep runs
    # again (its finished points are kept), at most twice; then the edge value is taken as it is.
    for widen in 0 1 2; do
      sweep=("$PY" -m experiments.sweep --flagfile=$SETTING --flagfile=experiments/configs/methods/$method.flags
             --validation_fraction=$VALIDATION --rounds=$TUNE_ROUNDS "${SMALL[@]}"
             "--sweep=$param=$values" --sweep_dir="$TUNE_DIR/$method")
      step "tune_$method" "${sweep[@]}" || { failed=1; break; }
      extend=(--extend_at_edge)
      [[ $widen == 2 ]] && extend=()
      sel=$(mktemp)
      step "select_$method" "$PY" -m experiments.select_tuned --tuning_sweep="$TUNE_DIR/$method" \
        --base_flagfile=experiments/configs/methods/$method.flags --out_flagfile="$METHODS_DIR/$method.flags" \
        --setting_note=$SETTING --sweep_command="${sweep[*]}" "${extend[@]}" | tee "$sel"
      rc=${PIPESTATUS[0]}
      grid=$(sed -n 's/^GRID //p' "$sel" | tail -n 1)
      rm -f "$sel"
      if [[ $rc == 6 && -n "$grid" ]]; then  # experiments/exit_codes.py: WIDEN_GRID
        values=${grid#*=}
        continue
      fi
      [[ $rc == 0 ]] || failed=1
      break
    done
  done
  untuned=$(grep -l "NOT YET TUNED" "$METHODS_DIR"/*.flags)
  if [[ $failed == 1 || -n "$untuned" ]]; then
    note "stop: tuning did not finish (failed=$failed; untuned: ${untuned:-none}); re-run this script"
    exit 1
  fi

  # 3. The comparison, part by part; each part runs even if an earlier one failed (part c's
  # strongest baselines wait for part a to finish; experiments.compare says so).
  cmp=("$PY" -m experiments.compare --flagfile=$COMPARE "${COMPARE_EXTRA[@]}" "${SMALL[@]}")
  step part_a_first_iid "${cmp[@]}" --parts=first || failed=1
  step part_b_second_setting "${cmp[@]}" --parts=second || failed=1
  step part_c_seeds "${cmp[@]}" --parts=seeds || failed=1
  # The issue's "done" check: the plain command finds every run done and rebuilds the tables.
  step check_tables "${cmp[@]}" || failed=1
  note "finished: failed=$failed"
  exit $failed
}

main "$@"; exit $?
