#!/usr/bin/env bash
# One dated benchmark run: every bench script in sequence, each appending its section to
# docs/benchmarks.md. Run on a quiet machine; extra arguments (e.g. --no-record) go to every
# script. A failing script is reported and the rest still run, so one problem costs one section.
#
#   bench/run_all.sh                # record
#   bench/run_all.sh --no-record    # dry run: print the tables only
set -uo pipefail

cd "$(dirname "$0")"
PY=../.venv/bin/python
SCRIPTS=(
    train_throughput.py
    bulk_predict.py
    single_task.py
    responsiveness.py
    incremental_update.py
    preannotate_vs_retrieve.py
    learning_curve.py
)
EXTRA=(--profile)  # bulk_predict only: py-spy profile of the /predict run

failed=()
for script in "${SCRIPTS[@]}"; do
    args=("$@")
    [[ $script == bulk_predict.py ]] && args+=("${EXTRA[@]}")
    echo "=== $script $(date -u +%H:%M:%S) ==="
    started=$SECONDS
    if ! "$PY" "$script" "${args[@]}"; then
        failed+=("$script")
    fi
    echo "=== $script done in $((SECONDS - started)) s ==="
done
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all benchmarks done; see docs/benchmarks.md"
