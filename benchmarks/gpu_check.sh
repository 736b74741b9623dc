#!/usr/bin/env bash
# One call that settles docs/gpu.md's predictions, within 8 minutes on one GPU, on a machine that
# reaches no package index and holds Python, torch, triton, transformers, peft and pytest-xdist:
#   1. setup: the GPU and versions; the peer wheels of benchmarks/gpu_wheels/ (downloaded where
#      an index is reachable by benchmarks/fetch_gpu_wheels.sh) installed with pip --no-index
#      --no-deps into a throwaway folder that only the benchmark sees (torch is never touched);
#   2. the test suite on CUDA (PYALIGN_TEST_DEVICE=cuda, pytest-xdist, the kernel tests first; the
#      C++/CUDA extension JIT-builds inside it), in the time the benchmark's share leaves;
#   3. the head benchmark at the anchor shapes (benchmarks/bench_gpu_head.py), with the peers;
#   4. `pyalign doctor` (backends, extension, the strategy cache `auto` filled) and the report:
#      benchmarks/gpu_report.py puts each measured row beside the cost model's prediction.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # here, once: benchmarks/gpu_wheels/*.whl
#   bash benchmarks/gpu_check.sh [OUT_DIR]         # there; default OUT_DIR: gpu_check_out/
#
# OUT_DIR gets seven files: env.log, tests.log, tests.xml, bench.log, bench.json, report.md,
# report.json. Environment: PYTHON (default python3), TOTAL_SECONDS (480), BENCH_SECONDS (190,
# the benchmark's share), TEST_WORKERS (12), TEST_ARGS (default: every test, kernel tests
# first), BENCH_ARGS (extra arguments of bench_gpu_head.py). Without a CUDA GPU it prints one
# line and exits 0.
set -u
OUT="${1:-gpu_check_out}"
PY="${PYTHON:-python3}"
TOTAL="${TOTAL_SECONDS:-480}"
BENCH="${BENCH_SECONDS:-190}"
cd "$(cd "$(dirname "$0")" && pwd)/.."

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run"
    exit 0
fi

start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PEERS="$(mktemp -d)"
DEPS="$(mktemp -d)"
trap 'rm -rf "$PEERS" "$DEPS"' EXIT
# pyalign's own needs the machine lacks (benchmarks/gpu_wheels/deps/): seen by every step, and
# ninja's command on PATH for torch's extension build
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}" PATH="$DEPS/bin:$PATH" PYTHONUNBUFFERED=1
unset PYALIGN_HEAD_STRATEGY PYALIGN_BACKEND

# bounded SECONDS CMD...: CMD under timeout, which puts it in a process group of its own and
# stops that group with SIGINT at SECONDS (pytest still writes its report), SIGKILL 20 s later;
# whatever the group left running (xdist workers) is killed after, so no step outlives its share.
bounded() {
    local seconds=$1 rc
    shift
    timeout -s INT -k 20 "$seconds" "$@" &
    local group=$!
    wait "$group"
    rc=$?
    kill -KILL -- "-$group" 2>/dev/null
    return "$rc"
}

{
    echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
    nvidia-smi 2>&1 | head -n 20
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0), '| triton',
triton.__version__)"
    echo "== pyalign's dependencies the machine lacks, into $DEPS"
    missing=$("$PY" -c "import importlib.metadata as m, pathlib, sys
for wheel in sorted(pathlib.Path('benchmarks/gpu_wheels/deps').glob('*.whl')):
    try:
        m.version(wheel.name.split('-')[0])
    except m.PackageNotFoundError:
        print(wheel)" 2>/dev/null)
    if [ -n "$missing" ]; then
        echo "$missing"
        # shellcheck disable=SC2086
        "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$DEPS" $missing
    else
        echo "none missing (or no wheels in benchmarks/gpu_wheels/deps/)"
    fi
    command -v ninja > /dev/null && echo "ninja: $(command -v ninja)" \
        || echo "no ninja: the C++/CUDA extension cannot build, its ops run on eager"
    echo "== peer wheels into $PEERS (seen by the benchmark only)"
    if ls benchmarks/gpu_wheels/*.whl > /dev/null 2>&1; then
        ls -l benchmarks/gpu_wheels/
        "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$PEERS" benchmarks/gpu_wheels/*.whl \
            || for wheel in benchmarks/gpu_wheels/*-none-any.whl; do  # pure Python: unzip
                   "$PY" -m zipfile -e "$wheel" "$PEERS"; done
    else
        echo "no wheels in benchmarks/gpu_wheels/ (bash benchmarks/fetch_gpu_wheels.sh where an" \
             "index is reachable, and carry the folder): the peers' rows are left out"
    fi
    PYTHONPATH="$PEERS:$PYTHONPATH" "$PY" -c "import importlib
for name in ('liger_kernel.ops', 'trl.kernels.chunked_logprob', 'cut_cross_entropy'):
    try:
        importlib.import_module(name); print('peer', name, 'imports')
    except Exception as exc:
        print('peer', name, 'does not import:', type(exc).__name__, exc)"
} > "$OUT/env.log" 2>&1

workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-12}" --dist worksteal)
# shellcheck disable=SC2206
tests=(${TEST_ARGS:-tests/ops tests/toolchain $(ls -d tests/*/ tests/test_*.py | grep -v -e '^tests/ops/' -e '^tests/toolchain/' -e __pycache__)})
tests_rc=124
# the suite ends, its 20 s of grace included, with BENCH + 30 s left: the benchmark's share
# and 45 s for doctor and the report
seconds=$(( $(left) - BENCH - 50 ))
if [ "$seconds" -gt 30 ]; then
    PYALIGN_TEST_DEVICE=cuda bounded "$seconds" "$PY" -m pytest -v -rfEs -p no:cacheprovider \
        "${workers[@]}" --durations=15 --junitxml="$OUT/tests.xml" "${tests[@]}" \
        > "$OUT/tests.log" 2>&1
    tests_rc=$?
fi

bench_rc=124
seconds=$(( $(left) - 45 ))
if [ "$seconds" -gt 30 ]; then
    # shellcheck disable=SC2086
    PYTHONPATH="$PEERS:$PYTHONPATH" bounded "$seconds" "$PY" benchmarks/bench_gpu_head.py \
        --device cuda --no-progress --json "$OUT/bench.json" --budget-s $(( seconds - 25 )) \
        ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
    bench_rc=$?
fi

{
    echo "== pyalign doctor, after the benchmark"
    bounded 30 "$PY" -m pyalign.cli doctor
} >> "$OUT/env.log" 2>&1

"$PY" benchmarks/gpu_report.py "$OUT" --tests-rc "$tests_rc" --bench-rc "$bench_rc" \
    --seconds "$(( $(date +%s) - start ))"
