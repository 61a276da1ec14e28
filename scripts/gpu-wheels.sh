#!/usr/bin/env bash
# Prepare wheels/: what scripts/gpu-check.sh installs on the GPU machine, which has no package registry.
#
#   bash scripts/gpu-wheels.sh [DIR]      (make gpu-wheels; DIR defaults to wheels/, git-ignored)
#
# The GPU machine (Python 3.12, torch 2.11 CUDA, transformers 5.17, accelerate, peft, safetensors,
# tokenizers, pyarrow, tensorboard, pytest) lacks what the GPU tests import beyond those: trl,
# datasets (and its dill, multiprocess, xxhash, pandas), bitsandbytes, pydantic(-settings). runpod and
# boto3 are not carried: the GPU tests never import them (handler imports runpod only in main();
# S3 and Supabase clients are imported only when configured); the benchmark's GPU section (bench/gpu.py)
# imports nothing beyond the worker and transformers' Trainer. Everything must fit 64 MiB:
# bitsandbytes 0.50.2's wheel alone is 43 MB, most of it its CUDA 11/12 and ROCm libraries; the machine's
# torch is CUDA 13, so the wheel travels slimmed to its CUDA 13 and CPU libraries (scripts/slim_wheel.py).
# transformers 5.24 does not travel: the check runs on the machine's transformers 5.17.
#
# Wheels are for CPython 3.12 on manylinux x86_64, binary only, without dependencies (the list below
# is the closure, checked against this venv); versions are this repo's pins, else this venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheels}
py=${PY:-.venv/bin/python}
limit=$((64 * 1024 * 1024))

# distribution (as pip names it) — the ones the GPU run imports that the machine lacks.
carry=(
    bitsandbytes trl datasets dill multiprocess xxhash pandas python-dateutil six fsspec
    pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv urllib3
    matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing
    liger-kernel flash-linear-attention fla-core einops
)

# The image's optional kernels (requirements-gpu.txt) travel too, so the check runs what the image
# runs; fla-core and einops are flash-linear-attention's own requirements, pinned here.
declare -A extra_pins=([fla-core]=0.6.0 [einops]=0.8.2)

version_of() {  # the repo's pin, else this script's, else what this venv has
    local name=$1 pin
    pin=$(grep -hiE "^${name}==" requirements.txt requirements-dev.txt requirements-gpu.txt 2>/dev/null | head -1 || true)
    if [ -n "$pin" ]; then echo "${pin#*==}"; return; fi
    if [ -n "${extra_pins[$name]:-}" ]; then echo "${extra_pins[$name]}"; return; fi
    "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name"
}

# Every manylinux level up to glibc 2.35 (the GPU machine's, at least) and pure-Python wheels.
platforms=(--platform any --platform manylinux2014_x86_64)
for minor in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done

rm -rf "$out"
mkdir -p "$out"
specs=()
for name in "${carry[@]}"; do
    specs+=("${name}==$(version_of "$name")")
done
echo "gpu-wheels: downloading ${#specs[@]} wheels for cp312 manylinux x86_64 into $out/" >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$out" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${platforms[@]}" "${specs[@]}"

"$py" scripts/slim_wheel.py "$out"/bitsandbytes-*.whl --keep 'libbitsandbytes_(cuda13[0-9]|cpu)\.so$' \
    --drop 'libbitsandbytes_(cuda|rocm)[0-9]+\.so$'
printf '%s\n' "${specs[@]}" > "$out/carried.txt"
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
ls -l "$out"/*.whl | awk '{printf "%10d  %s\n", $5, $9}' >&2
printf 'gpu-wheels: %d wheels, %.1f MiB of the 64 MiB a run may carry\n' \
    "$(ls "$out"/*.whl | wc -l)" "$(echo "$total / 1048576" | bc -l)" >&2
if [ "$total" -gt "$limit" ]; then
    echo "gpu-wheels: $out is over 64 MiB; it cannot travel to the GPU machine" >&2
    exit 1
fi
