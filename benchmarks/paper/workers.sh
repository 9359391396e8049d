#!/usr/bin/env bash
# Run the grid with several workers on one machine (a GPU box: each worker trains one cell at a time and takes the
# next unclaimed one). Logs go to $LOG_DIR (default runs-logs/ in the scratch folder).
#
#   bash benchmarks/paper/workers.sh 12 --setting fewshot --tasks tnews iflytek --budget-minutes 60
#
# A worker stopped by --budget-minutes gives its cell's claim back and leaves its run folder resumable; a worker
# that dies (killed, out of memory: its log ends in "Killed") keeps its claim: delete that cell's folder under
# $FLTUNING_BENCH_DIR/claims so that the next launch takes it again. Mind memory: see README.md beside this file.
set -u
n=${1:?usage: workers.sh N [run.py arguments]}
shift
bench=${FLTUNING_BENCH_DIR:-$HOME/.cache/fltuning/bench}
logs=${LOG_DIR:-$bench/runs-logs}
mkdir -p "$logs" "$bench/claims"
here=$(dirname "$0")
for i in $(seq 1 "$n"); do
  python3 "$here/run.py" "$@" --threads 1 --claim-dir "$bench/claims" > "$logs/worker$i.log" 2>&1 &
  sleep 2  # staggered: the first cells' drawn splits are written once
done
wait
grep -h "dev .* test" "$logs"/worker*.log | wc -l | xargs echo "runs finished:"
