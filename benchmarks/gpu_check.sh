#!/usr/bin/env bash
# One-call GPU check: the whole test suite on the GPU (PYALIGN_TEST_DEVICE=cuda) and the
# benchmark suite with GPU rows, within 8 minutes, then a Markdown + JSON report.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check_out/
#
# Environment: PYTHON (default: python), TEST_SECONDS (default 330: the suite's share of the
# 480 s), BENCH_ARGS (default "--cases all"). Writes OUT_DIR/report.md and report.json (made by
# benchmarks/gpu_report.py) next to the raw tests.xml, tests.log, bench.json, bench.txt.
# On a machine without a CUDA GPU it prints one line and exits 0.
set -u
OUT="${1:-gpu_check_out}"
PY="${PYTHON:-python}"
TOTAL=480
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run"
    exit 0
fi

mkdir -p "$OUT"
start=$(date +%s)
# SIGINT first: pytest then stops cleanly and still writes its junit XML and summary.
PYALIGN_TEST_DEVICE=cuda timeout -s INT -k 20 "${TEST_SECONDS:-330}" \
    "$PY" -m pytest -v -rA -p no:cacheprovider --junitxml="$OUT/tests.xml" tests \
    > "$OUT/tests.log" 2>&1
tests_rc=$?

left=$(( TOTAL - ($(date +%s) - start) - 15 ))
bench_rc=124
if [ "$left" -gt 20 ]; then
    # shellcheck disable=SC2086
    timeout -k 10 "$left" "$PY" -m pyalign.cli bench --device cuda --no-progress \
        ${BENCH_ARGS:---cases all} --json "$OUT/bench.json" > "$OUT/bench.txt" 2> "$OUT/bench.log"
    bench_rc=$?
fi

"$PY" benchmarks/gpu_report.py "$OUT" --tests-rc "$tests_rc" --bench-rc "$bench_rc" \
    --seconds "$(( $(date +%s) - start ))"
