#!/usr/bin/env bash
# The GPU check: one command, on a machine with one CUDA GPU and no package registry.
#
#   bash scripts/gpu-check.sh [RESULTS_DIR]
#
# Prepare on a machine with a registry first: `make gpu-wheels` (scripts/gpu-wheels.sh) fills wheels/
# with what the GPU machine lacks (≤ 64 MiB); carry wheels/ with the repo. Then this script:
#   1. records the machine: card, driver, CUDA, Python and library versions;
#   2. installs the carried wheels that the machine's Python lacks into build/gpu-site (never over
#      what it has: torch, transformers, accelerate, peft stay the machine's own), with no registry;
#   3. checks that the worker imports and runs its start-up fitness checks with a GPU required;
#   4. runs `make test-gpu` (the gpu-marked tests; pytest directly where make is missing);
#   5. runs the GPU section of the benchmark (bench/train_throughput.py on CUDA);
# and writes everything to RESULTS_DIR (default build/gpu-check, and $OUT when the device runner sets
# it): results.md for BENCHMARKS.md's GPU section, the raw logs, junit.xml and the benchmark JSON.
# Budget: under 8 minutes on one H100/H200-class card. Exit status: the tests'.
# A rehearsal on a CPU machine (every GPU test skips; the benchmark runs on the CPU):
#   GPU_PY=.venv/bin/python GPU_CHECK_REQUIRE_GPU=false GPU_CHECK_BENCH_EXAMPLES=16 bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-build/gpu-check}}
py=${GPU_PY:-$(command -v python3 || command -v python)}
site=$PWD/build/gpu-site
mkdir -p "$results" "$site"
log() { echo "gpu-check: $*" | tee -a "$results/gpu-check.log" >&2; }
started=$(date +%s)

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export MPLCONFIGDIR=$PWD/build/mpl PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

# 1. The machine.
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        | sed 's/^/gpu: /' || echo "gpu: nvidia-smi not available"
} > "$results/machine.txt"

# 2. The carried wheels, only those whose distribution the machine's Python lacks.
if compgen -G "wheels/*.whl" > /dev/null; then
    missing=()
    for wheel in wheels/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        if ! "$py" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            missing+=("$wheel")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${#missing[@]} carried wheels into $site: $(printf '%s ' "${missing[@]##*/}")"
        if "$py" -m pip --version > /dev/null 2>&1; then
            "$py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$site" \
                "${missing[@]}" >> "$results/gpu-check.log" 2>&1 || { log "installing the wheels failed (see the log)"; exit 2; }
        else  # no pip: a wheel is a zip of the site-packages tree
            for wheel in "${missing[@]}"; do
                "$py" -m zipfile -e "$wheel" "$site" || { log "unpacking $wheel failed"; exit 2; }
            done
        fi
    else
        log "the machine already has every carried distribution"
    fi
else
    log "no wheels/ folder: using only what the machine has (make gpu-wheels prepares it)"
fi

"$py" - > "$results/versions.json" 2>> "$results/gpu-check.log" <<'PY'
import importlib.metadata as m, json, platform
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
       if torch.cuda.is_available() else None,
       "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
for dist in ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "huggingface_hub",
             "tokenizers", "safetensors", "pydantic", "liger-kernel", "flash-linear-attention", "flash-attn",
             "causal-conv1d", "triton"):
    try:
        out[dist] = m.version(dist)
    except m.PackageNotFoundError:
        out[dist] = None
from training.kernels import detect_kernels
out["kernels"] = detect_kernels()
print(json.dumps(out, indent=2))
PY
log "versions: $(tr -d '\n ' < "$results/versions.json")"

# 3. The worker imports, and its start-up checks pass with a GPU required.
if ! REQUIRE_GPU=${GPU_CHECK_REQUIRE_GPU:-true} VOLUME_ROOT=$PWD/build/gpu-volume "$py" - >> "$results/gpu-check.log" 2>&1 <<'PY'
import logging, os
os.makedirs(os.environ["VOLUME_ROOT"], exist_ok=True)
logging.basicConfig(level=logging.INFO)
import cli, handler, pipeline, selftest, train_lora  # noqa: F401  the whole worker imports
import fitness
for check in fitness.checks(handler.get_settings()):
    check()
    print("fitness check passed:", check.__name__)
PY
then
    log "the worker does not import or a fitness check failed on this machine (see gpu-check.log)"
    tail -20 "$results/gpu-check.log" >&2
    exit 3
fi
log "worker imports and fitness checks pass"

# 4. The gpu-marked tests (-s: the tests print their figures).
pytest_args=(-s --junitxml="$results/junit.xml" -o junit_logging=system-out)
if command -v make > /dev/null; then
    timeout 420 make --no-print-directory test-gpu GPU_PY="$py" PYTEST_ARGS="${pytest_args[*]}" \
        > "$results/test-gpu.log" 2>&1
else
    timeout 420 "$py" -m pytest -m gpu -rs -p no:cacheprovider "${pytest_args[@]}" tests/ \
        > "$results/test-gpu.log" 2>&1
fi
tests_rc=$?
tail -25 "$results/test-gpu.log" >&2
log "make test-gpu exited $tests_rc after $(( $(date +%s) - started ))s"

# 5. The GPU section of the benchmark: the batching strategies on CUDA, side by side.
bench_rc=0
examples=${GPU_CHECK_BENCH_EXAMPLES:-256}
timeout 150 "$py" bench/train_throughput.py --examples "$examples" --rounds 2 \
    --out "$results/train_throughput-gpu.json" > "$results/bench.log" 2>&1 || bench_rc=$?
tail -8 "$results/bench.log" >&2
log "benchmark exited $bench_rc"

# results.md: what goes into BENCHMARKS.md's GPU section.
"$py" - "$results" "$tests_rc" "$bench_rc" "$(( $(date +%s) - started ))" "$examples" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
results, tests_rc, bench_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
examples = sys.argv[5]
versions = json.loads((results / "versions.json").read_text())
lines = ["## GPU check (scripts/gpu-check.sh)", "", (results / "machine.txt").read_text().strip(), "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v not in (None, {}, False)), "",
         f"`make test-gpu`: exit {tests_rc}; total {seconds}s", "", "| test | result | seconds |", "|---|---|---|"]
junit = results / "junit.xml"
if junit.is_file():
    for case in ET.parse(junit).getroot().iter("testcase"):
        status = "skipped" if case.find("skipped") is not None else "FAILED" if (
            case.find("failure") is not None or case.find("error") is not None) else "passed"
        lines.append(f"| {case.get('classname', '').split('.')[-1]}::{case.get('name')} | {status} | "
                     f"{float(case.get('time', 0)):.1f} |")
log = (results / "test-gpu.log").read_text(errors="replace") if (results / "test-gpu.log").is_file() else ""
figures = [l for l in log.splitlines() if re.match(r"^(memory plan|eager|sdpa|flash_attention_2)\b", l.strip())]
if figures:
    lines += ["", "Figures printed by the tests:", "", "```", *figures, "```"]
bench_log = results / "bench.log"
lines += ["", f"Benchmark (`bench/train_throughput.py --examples {examples} --rounds 2`, raw figures in "
          f"train_throughput-gpu.json): exit {bench_rc}"]
if bench_log.is_file():
    printed = [l for l in bench_log.read_text(errors="replace").splitlines() if l.startswith(("round ", "padded", "padding_free", "packed"))]
    lines += ["", "```", *printed, "```"]
(results / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:12]))
PY
log "results in $results/results.md"
exit "$tests_rc"
