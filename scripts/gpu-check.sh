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
#   5. runs issue 11's shape twin on CUDA (bench/moe_shape_twin.py: two of Qwen3-Next-80B-A3B's layers at
#      their real shapes with all 512 experts, through the worker's 4-bit path: bytes against the plan,
#      extrapolated to the 80B, and torch.cuda.max_memory_allocated after loading and over 3 LoRA steps);
#   6. runs the GPU section of the benchmark, bench/gpu.py: an 8B-shape Llama (random bf16 weights built
#      on the GPU), the worker through handler.handler against a padded Trainer + PEFT, real tokens/s and
#      MFU, with and without padding-free (and flash attention where flash-attn imports), and a warm
#      worker's second load;
# and writes everything to RESULTS_DIR (default build/gpu-check, and $OUT when the device runner sets
# it): results.md for BENCHMARKS.md's GPU section, the raw logs, junit.xml, shape-twin.json and
# gpu-bench.json/.md.
# Budget: 8 minutes on one H100/H200-class card (GPU_CHECK_BUDGET_S, default 480 s): steps 1-3 take
# about a minute, the tests at most 220 s, the twin at most 110 s, the benchmark what is left (at most
# 210 s); each part has its own timeout, and what finished is kept. Exit status: the tests'.
# A rehearsal on a CPU machine (every GPU test skips; the benchmark runs its tiny shape on the CPU):
#   GPU_PY=.venv/bin/python GPU_CHECK_REQUIRE_GPU=false bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-build/gpu-check}}
py=${GPU_PY:-$(command -v python3 || command -v python)}
site=$PWD/build/gpu-site
mkdir -p "$results" "$site"
log() { echo "gpu-check: $*" | tee -a "$results/gpu-check.log" >&2; }
started=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-480}
left() { echo $(( budget - ($(date +%s) - started) )); }
at_most() { echo $(( $1 < $2 ? $1 : $2 )); }

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
tests_timeout=$(at_most $(( $(left) - 220 )) 220)  # the shape twin and the benchmark keep their minutes
[ "$tests_timeout" -ge 60 ] || tests_timeout=60
if command -v make > /dev/null; then
    timeout "$tests_timeout" make --no-print-directory test-gpu GPU_PY="$py" PYTEST_ARGS="${pytest_args[*]}" \
        > "$results/test-gpu.log" 2>&1
else
    # as the Makefile's test-gpu: only the modules with gpu-marked tests (the others import what this machine lacks)
    timeout "$tests_timeout" "$py" -m pytest -m gpu -rs -p no:cacheprovider "${pytest_args[@]}" \
        $(grep -l 'mark\.gpu' tests/test_*.py) \
        > "$results/test-gpu.log" 2>&1
fi
tests_rc=$?
tail -25 "$results/test-gpu.log" >&2
log "make test-gpu exited $tests_rc after $(( $(date +%s) - started ))s"

# 5. Issue 11's shape twin on the GPU: two of Qwen3-Next-80B-A3B's layers at their real shapes, all 512
# experts, loaded through the worker's 4-bit path; bytes per group against the plan, extrapolated to
# the 80B, and torch.cuda.max_memory_allocated after loading and over a few LoRA steps.
twin_rc=0
twin_budget=$(at_most $(( $(left) - 130 )) 110)  # the benchmark keeps at least 2 minutes
if ! "$py" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['gpu'] else 1)" "$results/versions.json"; then
    log "shape twin not run: no CUDA (a rehearsal)"; twin_rc=-1
elif [ "$twin_budget" -lt 45 ]; then
    log "shape twin not run: ${twin_budget}s left for it"; twin_rc=124
else
    timeout "$twin_budget" "$py" bench/moe_shape_twin.py --device cuda --layers 2 --experts 512 --steps 3 \
        --threads "$(nproc)" --out "${TMPDIR:-/tmp}/gpu-check-twin" > "$results/shape-twin.json" 2> "$results/shape-twin.log" \
        || twin_rc=$?
    rm -rf "${TMPDIR:-/tmp}/gpu-check-twin"
    log "shape twin exited $twin_rc after $(( $(date +%s) - started ))s"
fi

# 6. The GPU section of the benchmark (bench/gpu.py): the 8B shape on CUDA; without CUDA (a rehearsal,
# GPU_CHECK_REQUIRE_GPU=false) the same code on its tiny shape on the CPU.
bench_rc=0
bench_args=()
if ! "$py" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['gpu'] else 1)" "$results/versions.json"; then
    bench_args=(--shape tiny --device cpu)
fi
bench_budget=$(at_most $(( $(left) - 10 )) 210)
if [ "$bench_budget" -lt 60 ]; then
    log "benchmark not run: ${bench_budget}s left of the ${budget}s budget"
    bench_rc=124
else
    # The hard stop is a little past the bench's own budget: it stops its parts itself and keeps what finished.
    timeout "$(( bench_budget + 15 ))" "$py" bench/gpu.py ${bench_args[@]+"${bench_args[@]}"} --budget-s "$bench_budget" \
        --out "$results/gpu-bench.json" ${GPU_CHECK_BENCH_ARGS:-} > "$results/bench.log" 2>&1 || bench_rc=$?
    tail -3 "$results/bench.log" | cut -c1-400 >&2
    log "benchmark exited $bench_rc after $(( $(date +%s) - started ))s"
fi

# results.md: what goes into BENCHMARKS.md's GPU section.
"$py" - "$results" "$tests_rc" "$bench_rc" "$(( $(date +%s) - started ))" "$twin_rc" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
results, tests_rc, bench_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
twin_rc = int(sys.argv[5])
versions = json.loads((results / "versions.json").read_text())
lines = ["## GPU check (scripts/gpu-check.sh)", "", f"Command: `bash scripts/gpu-check.sh`, {seconds} s in all.", "",
         (results / "machine.txt").read_text().strip(), "",
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
twin = results / "shape-twin.json"
if twin_rc != -1:
    lines += ["", f"### Shape twin: bench/moe_shape_twin.py --device cuda --layers 2 --experts 512 (exit {twin_rc})", ""]
    try:
        lines += ["```json", json.dumps(json.loads(twin.read_text()), indent=1), "```"]
    except (OSError, ValueError):
        lines += ["No results: see shape-twin.log."]
bench = results / "gpu-bench.md"
lines += ["", f"### Benchmark: bench/gpu.py (exit {bench_rc}; figures in gpu-bench.json, logs in gpu-bench-*.log)", ""]
lines += [bench.read_text().strip() if bench.is_file() else "No results: see bench.log."]
(results / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:12]))
PY
log "results in $results/results.md"
exit "$tests_rc"
