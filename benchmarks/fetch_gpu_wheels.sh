#!/usr/bin/env bash
# Downloads, where a package index is reachable, the peer wheels that benchmarks/gpu_check.sh
# installs on a GPU machine that reaches none: built for that machine (CPython 3.12, x86-64
# Linux), without dependencies (torch, triton, transformers and packaging are there already):
#   - liger-kernel: its per-token head and its Triton fused linear cross-entropy (its CuTe DSL
#     kernel needs nvidia-cutlass-dsl, whose CUDA 13 libraries alone are a 92 MB wheel: not
#     carried; the benchmark says so in that row);
#   - cut-cross-entropy: linear_cross_entropy, impl="cce";
#   - trl: only trl.kernels.chunked_logprob is used, which imports without datasets and pandas.
# And, into benchmarks/gpu_wheels/deps/, what pyalign itself needs that the GPU machine lacks
# (gpu_check.sh installs each only where its distribution is missing, for the whole check):
#   - ninja: torch builds the C++/CUDA extension with it (without it every op runs on eager);
#   - matplotlib and the dependencies numpy and packaging do not cover: the trainers' plots.
# Into benchmarks/gpu_wheels/ (ignored by git: a device call carries it by name), replacing what
# was there (two versions of one package would stop the install); fails above 64 MiB in all.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # PYTHON (default python3) runs pip
set -euo pipefail
PY="${PYTHON:-python3}"
DEST="$(cd "$(dirname "$0")" && pwd)/gpu_wheels"
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0)
DEPS=(ninja matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six)
LIMIT=$(( 64 * 1024 * 1024 ))

download() {  # download DIR WHEEL...: wheels for CPython 3.12 on x86-64 Linux, no dependencies
    local dir=$1
    shift
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --progress-bar off -d "$dir" "$@"
}

mkdir -p "$DEST/deps"
rm -f "$DEST"/*.whl "$DEST"/deps/*.whl
download "$DEST" "${WHEELS[@]}"
download "$DEST/deps" "${DEPS[@]}"
total=$(cat "$DEST"/*.whl "$DEST"/deps/*.whl | wc -c)
ls -l "$DEST" "$DEST/deps"
echo "fetch_gpu_wheels: $(( ${#WHEELS[@]} + ${#DEPS[@]} )) wheels, $(( total / 1024 )) KiB in $DEST"
if [ "$total" -gt "$LIMIT" ]; then
    echo "fetch_gpu_wheels: over the 64 MiB a device call carries" >&2
    exit 1
fi
