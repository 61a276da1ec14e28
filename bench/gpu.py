"""The GPU section of the benchmark (issue 12): the worker against a hand-written padded Trainer + PEFT
on an 8B-class Llama, in real tokens/s and MFU, and a warm worker's second load.

    python bench/gpu.py [--shape 8b|tiny] [--device cuda|cpu] [--budget-s 300] [--out build/gpu-bench.json]
    python bench/gpu.py --shape tiny --device cpu      # the same code end to end on a CPU (a rehearsal)

`bench/run.py` runs it after its CPU arms when CUDA is present (`--gpu off`: never); so does
`scripts/gpu-check.sh`. Without CUDA (and without `--device cpu`) it runs nothing, and its last line is
`{"gpu": {"skipped": "<why>"}}`.

The model: Llama-3-8B's shape (`gpu_flops.LLAMA3_8B`, 8.03 B parameters) with random weights, built
directly on the GPU in bf16 (never in fp32, never on the host) and saved once, as bf16 safetensors, into
the worker's volume (in /dev/shm when it has room, else the temp folder): the one copy every arm loads.
The data: bench/train_throughput.py's long-tailed chat examples, one epoch, 16 rows a batch,
max_seq_length 512, LoRA r 16 / alpha 32 on every projection (bench/run.py's COMMON and TARGETS), bf16,
and no gradient checkpointing in any arm: the same work everywhere, and MFU counts no recomputation.

Each part runs in a child process of its own (its GPU memory its own), under a timeout cut to what is
left of ``--budget-s``; a part that overruns is killed and the rest still run:

- ``build``: the model and tokenizer, saved.
- ``padded_sdpa``: bench/run.py's padded arm on the GPU — Trainer + PEFT, batches padded to their
  longest row, ``attn_implementation="sdpa"``; ``padded_flash_attention_2``: the same with flash
  attention, only where flash-attn imports (training.kernels.detect_kernels).
- ``worker``: three jobs through ``handler.handler`` on one warm worker: a 2-step warm-up job (its load
  is the cold first load), then ``packing: "auto"`` (padding-free) and ``packing: false`` (padded), a
  full epoch each. The second job's ``load_s`` against the first's is the warm-load figure.

Every timed epoch follows a warm-up in the same process (CUDA context, kernels, allocator). Results:
``--out`` (JSON) and the Markdown table beside it (``.md``, for BENCHMARKS.md), rewritten after every part
so an overrun keeps what finished. Measurements, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_flops import (  # noqa: E402
    FORMULA,
    LLAMA3_8B,
    llama_counts,
    lora_training_flops,
    mfu,
    peak_or_reason,
)
from bench.gpu_report import ARMS, markdown  # noqa: E402
from bench.run import COMMON, TARGETS, _env, _lora  # noqa: E402
from bench.train_throughput import WORDS, records  # noqa: E402

SHAPES = {
    # Seconds per part on one H100/H200 (estimates: imports ~10 s, 16 GB written or loaded ~15-30 s, an
    # epoch of 16 steps a few seconds); each part's timeout is also cut to what is left of the budget.
    "8b": {"config": LLAMA3_8B, "examples": 256, "batch_size": 16, "min_start_s": 45,
           "timeouts": {"build": 120, "padded": 100, "worker": 200}},
    "tiny": {"config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=224, vocab_size=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            max_position_embeddings=4096),
             "examples": 32, "batch_size": 8, "min_start_s": 10,
             "timeouts": {"build": 90, "padded": 120, "worker": 180}},
}
PARTS = ("build", "padded_sdpa", "worker", "padded_flash_attention_2")
MODEL_NAME = "bench-llama"
WARMUP_STEPS = 2
MARK = "GPU-BENCH "  # the children's result lines; anything else on stdout is a library's
_children: set[int] = set()


def emit(row: dict) -> None:
    print(MARK + json.dumps(row), flush=True)


def model_dir(work: Path) -> Path:
    return work / "volume" / "models" / MODEL_NAME


def _dtype(device: str):
    import torch

    # The worker's precision rule (training/runtime.py): bf16 on a GPU, fp32 on a CPU.
    return torch.bfloat16 if device == "cuda" else torch.float32


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()  # CUDA runs ahead of Python: time only finished work


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


# --------------------------------------------------------------------------------------------------
# the parts, each in a child process


def part_build(work: Path, shape: dict, device: str) -> None:
    """The random model, made where it trains, in its training precision, and saved once."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from demo.tiny_models import train_tokenizer
    from training.kernels import detect_kernels

    started = time.monotonic()
    tokenizer = train_tokenizer([" ".join(WORDS), "Tell me something."])
    fields = {**shape["config"]}
    fields["vocab_size"] = fields["vocab_size"] or len(tokenizer)
    config = LlamaConfig(**fields, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    # Each tensor is allocated and initialised on the device, one at a time: 8 B parameters are 16 GB of
    # bf16 on the GPU and never exist on the host or in fp32.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(device))
    _sync(device)
    built = time.monotonic()
    folder = model_dir(work)
    # safetensors brings one shard at a time to the host to write it: at most 2 GB there at once.
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    saved = time.monotonic()
    kernels = detect_kernels(device == "cuda")
    emit({"parameters": sum(p.numel() for p in model.parameters()),
          "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
          "build_s": round(built - started, 2), "save_s": round(saved - built, 2), "config": fields,
          "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
          "flash_attn": kernels.get("flash-attn"), "kernels": kernels})


def _rows(tokenizer, work: Path) -> list[dict]:
    """bench/run.py's padded arm's rows: each chat through the chat template, cut to max_seq_length."""
    return [{"input_ids": list(tokenizer.apply_chat_template(r["messages"], tokenize=True,
                                                             return_dict=False))[:COMMON["max_seq_length"]]}
            for r in json.loads((work / "records.json").read_text())]


def part_padded(work: Path, shape: dict, device: str, attention: str) -> None:
    """What a user writes by hand, on the GPU: Trainer + PEFT, each batch padded to its longest row."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(COMMON["seed"])
    folder = model_dir(work)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = _rows(tokenizer, work)
    started = time.monotonic()
    # Straight onto the GPU; {"": 0} (not "cuda") so the Trainer sees the model on its own device.
    placement = {"device_map": {"": 0}} if device == "cuda" else {}
    model = _lora(AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(device), attn_implementation=attention,
                                                       **placement))
    load_s = time.monotonic() - started

    def trainer(**length) -> Trainer:
        args = TrainingArguments(output_dir=str(work / f"out-{attention}"),
                                 per_device_train_batch_size=shape["batch_size"], learning_rate=COMMON["learning_rate"],
                                 report_to="none", save_strategy="no", logging_steps=1000, seed=COMMON["seed"],
                                 use_cpu=device == "cpu", bf16=device == "cuda", disable_tqdm=True,
                                 include_num_input_tokens_seen="non_padding", **length)
        return Trainer(model=model, args=args, train_dataset=rows,
                       data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))

    trainer(max_steps=WARMUP_STEPS).train()
    timed = trainer(num_train_epochs=COMMON["epochs"])
    _reset_peak(device)
    _sync(device)
    started = time.monotonic()
    timed.train()
    _sync(device)
    lengths = [len(r["input_ids"]) for r in rows]
    emit({"attention": model.config._attn_implementation, "batching": "padded", "tokens": sum(lengths),
          "tokens_seen": int(timed.state.num_input_tokens_seen or 0), "steps": timed.state.global_step,
          "train_s": time.monotonic() - started, "load_s": round(load_s, 2), "lengths": lengths,
          "peak_gpu_gib": _peak_gib(device)})


WORKER_JOBS = (("warmup", {"packing": "auto", "max_steps": WARMUP_STEPS}),
               ("padding_free", {"packing": "auto"}),
               ("padded", {"packing": False}))


def part_worker(work: Path, shape: dict, device: str) -> None:
    """Three jobs on one warm worker through handler.handler: warm-up (the cold load), padding-free, padded."""
    os.environ.update({"VOLUME_ROOT": str(work / "volume"), "PROGRESS_INTERVAL_S": "60"})
    from transformers import AutoConfig

    import handler
    from config.job import TrainingJob
    from training.sft_config import plan_batching

    # bench/run.py's worker hyperparameters, at this shape's batch; checkpoints and gradient
    # checkpointing off, 16 bits: the same work as the padded arms.
    hp = {**COMMON, "batch_size": shape["batch_size"], "target_modules": TARGETS, "logging_steps": 1000,
          "gradient_accumulation_steps": 1, "save_steps": 100_000, "gradient_checkpointing": False,
          "quantization": "none"}
    config = AutoConfig.from_pretrained(model_dir(work))
    for name, extra in WORKER_JOBS:
        payload = {"base_model": MODEL_NAME, "job_id": f"gpu-bench-{name}", "hyperparameters": {**hp, **extra},
                   "dataset": {"uri": "datasets/records.jsonl"}}
        _reset_peak(device)
        output = handler.handler({"id": payload["job_id"], "input": payload})
        if "error" in output:
            raise SystemExit(f"worker job {name} failed: {output['error']}")
        timings, metrics = output["timings"], output["metrics"]
        emit({"job": name, "reused": output["base_model"]["load"]["reused"], "load_s": timings["load_s"],
              "train_s": timings["train_s"], "total_s": timings["total_s"], "tokens": metrics["train_tokens"],
              "steps": metrics["steps"], "runtime": output.get("runtime"), "peak_gpu_gib": _peak_gib(device),
              "batching": plan_batching(TrainingJob.from_payload(payload).hyperparameters, config)})
    emit({"lengths": _worker_lengths(payload, handler.get_settings(), work)})


def _worker_lengths(payload: dict, settings, work: Path) -> list[int]:
    """Each example's length as the worker tokenised it: its own read_dataset and tokenize_dataset."""
    from config.job import TrainingJob
    from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset

    job = TrainingJob.from_payload(payload)
    hp = job.hyperparameters
    raw = read_dataset(job.dataset, settings, seed=hp.seed)
    prepared = tokenize_dataset(raw, load_tokenizer(model_dir(work)), max_seq_length=hp.max_seq_length,
                                train_on_inputs=hp.train_on_inputs)
    return [len(ids) for ids in prepared.train["input_ids"]]


def child(part: str, work: Path, shape_name: str, device: str) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if device == "cpu":
        torch.set_num_threads(1)  # as bench/run.py: on a shared machine, idle OpenMP threads spin
    shape = SHAPES[shape_name]
    if part == "build":
        part_build(work, shape, device)
    elif part == "worker":
        part_worker(work, shape, device)
    else:
        part_padded(work, shape, device, part.removeprefix("padded_"))


# --------------------------------------------------------------------------------------------------
# the parent: a part at a time, each under its timeout


def run_part(argv: list[str], timeout: float, log: Path, env: dict) -> tuple[list[dict], str]:
    """Run one child; its result lines and a status ("ok", "failed …", "timed out …"). Never raises for
    the child's sake: a part that fails or overruns leaves the lines it printed before."""
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        # A session of its own: a timeout kills the child and anything it started.
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, text=True, start_new_session=True)
        _children.add(proc.pid)
        try:
            code = proc.wait(timeout=max(timeout, 1))
            status = "ok" if code == 0 else f"failed (exit {code}): {_last_line(log)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {timeout:.0f}s and was stopped"
        finally:
            _children.discard(proc.pid)
        out.seek(0)
        rows = [json.loads(line[len(MARK):]) for line in out if line.startswith(MARK)]
    return rows, status


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1][:300] if lines else "no output") + f" (log: {log.name})"


def _stop_children(signum, frame) -> None:
    for pid in list(_children):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had already ended
    raise SystemExit(128 + signum)


def detect_device(requested: str | None) -> tuple[str | None, str | None]:
    """(device, None) to run on, or (None, why the section is skipped)."""
    import torch

    if requested == "cpu":
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", None
    return None, (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
                  f"built for CUDA {torch.version.cuda or 'none'})")


def machine() -> dict:
    """Card, driver and versions, without touching CUDA in this process."""
    import importlib.metadata as metadata

    info: dict = {"python": platform.python_version(), "host": platform.machine()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, memory = (part.strip() for part in smi.stdout.splitlines()[0].split(",", 2))
            info.update({"nvidia_smi_name": name, "driver": driver, "gpu_memory": memory})
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None  # no nvidia-smi: a CPU machine
    import torch

    info["cuda"] = torch.version.cuda
    for dist in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "flash-attn"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _work_folder(bytes_needed: int) -> Path:
    """/dev/shm when it holds the model with room to spare (loads then come from memory), else the temp
    folder. Folders of earlier runs whose process is gone are removed first."""
    for base in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        if not base.is_dir() or not os.access(base, os.W_OK):
            continue
        for stale in base.glob("gpu-bench-*"):
            owner = stale / "owner.pid"
            if owner.is_file() and not _alive(int(owner.read_text() or 0)):
                shutil.rmtree(stale, ignore_errors=True)
        if shutil.disk_usage(base).free >= bytes_needed * 1.2 + 2**30:
            work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=base))
            (work / "owner.pid").write_text(str(os.getpid()))
            return work
    raise NoRoom(f"no room for the model ({bytes_needed / 2**30:.1f} GiB) in /dev/shm or {tempfile.gettempdir()}")


class NoRoom(RuntimeError):
    """The section cannot start: nowhere to save the model."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return pid > 0


def _prepare(work: Path, shape: dict) -> None:
    data = records(shape["examples"])
    (work / "records.json").write_text(json.dumps(data))
    datasets = work / "volume" / "datasets"
    datasets.mkdir(parents=True)
    (datasets / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


def _child_env(device: str) -> dict:
    env = _env()
    if device == "cuda":  # the host side (loading, tokenising) of a GPU run may use every core
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if name in os.environ:
                env[name] = os.environ[name]
            else:
                env.pop(name, None)
    return env


def run_section(shape_name: str, device: str, budget_s: float, out: Path, command: str) -> dict:
    """Every part in turn within ``budget_s``; the result (also written to ``out`` and ``out``.md after each part)."""
    shape = SHAPES[shape_name]
    started = time.monotonic()
    result: dict = {"command": command, "shape": shape_name, "device": device, "budget_s": budget_s,
                    "machine": machine(), "flops_formula": FORMULA, "parts": {}, "raw": {}}
    counts = llama_counts({**shape["config"], "vocab_size": shape["config"]["vocab_size"] or 512}, COMMON["lora_r"])
    work = _work_folder(counts.total * (2 if device == "cuda" else 4))
    result["work_folder"] = str(work.parent)
    logs = out.parent
    logs.mkdir(parents=True, exist_ok=True)
    try:
        _prepare(work, shape)
        for part in PARTS:
            status = _why_not(part, result, started + budget_s - time.monotonic(), shape, budget_s)
            if status is None:
                kind = "padded" if part.startswith("padded") else part
                timeout = min(shape["timeouts"][kind], started + budget_s - time.monotonic())
                part_started = time.monotonic()
                result["parts"][part] = {"status": "stopped: the bench was terminated while it ran"}
                rows, status = run_part([sys.executable, str(Path(__file__).resolve()), "--part", part,
                                         "--work", str(work), "--shape", shape_name, "--device", device],
                                        timeout, logs / f"{out.stem}-{part}.log", _child_env(device))
                result["raw"][part] = rows
                result["parts"][part] = {"status": status, "seconds": round(time.monotonic() - part_started, 1)}
            else:
                result["parts"][part] = {"status": status}
            result["seconds"] = round(time.monotonic() - started, 1)
            write(out, summarise(result, shape))
    except SystemExit:  # SIGTERM (_stop_children): keep the part that was running in the record
        result["seconds"] = round(time.monotonic() - started, 1)
        write(out, summarise(result, shape))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    return write(out, summarise(result, shape))


def _why_not(part: str, result: dict, left: float, shape: dict, budget_s: float) -> str | None:
    """Why a part does not run (None: it runs)."""
    built = result["raw"].get("build")
    if part != "build" and not built:
        return "not run: the model was not built"
    if part == "padded_flash_attention_2" and not built[0].get("flash_attn"):
        return ("not run: flash-attn is not installed or does not import here"
                + ("" if result["device"] == "cuda" else " (it needs CUDA)"))
    if left < shape["min_start_s"]:
        return f"not run: {max(left, 0):.0f}s left of --budget-s {budget_s:.0f}"
    return None


def summarise(result: dict, shape: dict) -> dict:
    """The figures from the parts' raw lines: tokens/s, MFU, ratios, the warm load."""
    raw = result["raw"]
    built = (raw.get("build") or [None])[0]
    summary = {k: v for k, v in result.items() if k != "raw"}
    if built is None:
        return summary
    counts = llama_counts(built["config"], COMMON["lora_r"])
    peak, reason = peak_or_reason(result["device"], built["device_name"])
    summary["model"] = {"parameters": built["parameters"], "parameters_counted": counts.total,
                        "frozen_matmul_parameters": counts.frozen_matmul, "lora_parameters": counts.lora,
                        "bytes": built["bytes"], "build_s": built["build_s"], "save_s": built["save_s"],
                        "layers": counts.layers, "hidden_size": built["config"]["hidden_size"]}
    if built["parameters"] != counts.total:  # the FLOPs count from the config: say when the model disagrees
        summary["model"]["warning"] = (f"the built model has {built['parameters']:,} parameters, the count from "
                                       f"its config {counts.total:,}: the FLOPs may be off")
    summary["card"] = built["device_name"]
    summary["peak"] = None if peak is None else {"card": peak.card, "bf16_dense_tflops": peak.tflops,
                                                 "source": peak.source}
    summary["mfu_null_reason"] = reason
    summary["setup"] = {"examples": shape["examples"], "batch_size": shape["batch_size"],
                        "max_seq_length": COMMON["max_seq_length"], "epochs": COMMON["epochs"],
                        "lora_r": COMMON["lora_r"], "lora_alpha": COMMON["lora_alpha"], "targets": TARGETS,
                        "precision": "bf16" if result["device"] == "cuda" else "fp32",
                        "gradient_checkpointing": False, "warmup_steps": WARMUP_STEPS}
    arms: dict = {}
    for part in ("padded_sdpa", "padded_flash_attention_2"):
        if raw.get(part):
            arms[part] = _arm(raw[part][0], raw[part][0]["lengths"], counts, peak)
    jobs = {row["job"]: row for row in raw.get("worker", []) if "job" in row}
    lengths = next((row["lengths"] for row in raw.get("worker", []) if "lengths" in row), None)
    for job in ("padding_free", "padded"):
        if job in jobs and lengths is not None:
            arms[f"worker_{job}"] = _arm(jobs[job], lengths, counts, peak)
    base = arms.get("padded_sdpa")
    for arm in arms.values():
        arm["vs_padded_sdpa"] = round(arm["tokens_per_second"] / base["tokens_per_second"], 3) if base else None
    summary["arms"] = {key: arms[key] for key, _ in ARMS if key in arms}
    summary["warm_load"] = _warm_load(jobs)
    return summary


def _arm(row: dict, lengths: list[int], counts, peak) -> dict:
    flops = lora_training_flops(counts, lengths)
    value = mfu(flops, row["train_s"], peak)
    arm = {key: row.get(key) for key in ("attention", "batching", "tokens", "steps", "load_s", "peak_gpu_gib")}
    if row.get("runtime"):
        arm["attention"] = row["runtime"].get("attention")
        arm["kernels"] = row["runtime"].get("kernels")
    arm.update({"train_s": round(row["train_s"], 3),
                "tokens_per_second": round(row["tokens"] / row["train_s"], 1),
                # the Trainer's own count (non-padding) against the sum of the lengths the FLOPs use
                "tokens_counted_by_trainer": row.get("tokens_seen", row["tokens"]), "tokens_from_lengths": sum(lengths),
                "tflops": round(flops / 1e12, 3), "mfu": None if value is None else round(value, 4)})
    return arm


def _warm_load(jobs: dict) -> dict | None:
    first, second = jobs.get("warmup"), jobs.get("padding_free")
    if first is None:
        return None
    out = {"first_job_load_s": first["load_s"], "first_job_reused": first["reused"],
           "first_job_outside_train_s": round(first["total_s"] - first["train_s"], 3)}
    if second is not None:
        out.update({"second_job_load_s": second["load_s"], "second_job_reused": second["reused"],
                    "second_job_outside_train_s": round(second["total_s"] - second["train_s"], 3),
                    "second_vs_first_load": round(second["load_s"] / first["load_s"], 4) if first["load_s"] else None})
    return out


def write(out: Path, summary: dict) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    return summary


def section(mode: str, out: Path) -> dict:
    """bench/run.py's hook: the GPU section (auto: when CUDA is present), or ``{"skipped": why}``."""
    if mode == "off":
        return {"skipped": "--gpu off"}
    device, reason = detect_device(None)
    if device is None:
        return {"skipped": reason}
    try:
        return run_section("8b", device, 300, out, "bench/run.py (its GPU section: bench/gpu.py --shape 8b)")
    except NoRoom as exc:  # the CPU arms' figures are still printed
        return {"error": str(exc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), help="8b (the default on CUDA) or tiny (a CPU rehearsal)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when present, else skip")
    parser.add_argument("--budget-s", type=float, default=300, help="every part within this many seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-bench.json")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        child(args.part, args.work, args.shape, args.device)
        return
    device, reason = detect_device(args.device)
    if device is None:
        summary = {"skipped": reason}
        write(args.out, summary)
    else:
        shape = args.shape or ("8b" if device == "cuda" else "tiny")
        if shape == "8b" and device != "cuda":
            parser.error("--shape 8b needs CUDA (16 GB of bf16 weights); use --shape tiny for a CPU rehearsal")
        signal.signal(signal.SIGTERM, _stop_children)  # `timeout` sends SIGTERM: stop the children too
        try:
            summary = run_section(shape, device, args.budget_s, args.out,
                                  " ".join(["python bench/gpu.py", *sys.argv[1:]]))
        except NoRoom as exc:
            print(json.dumps({"gpu": {"error": str(exc)}}))
            sys.exit(1)
        print(markdown(summary), file=sys.stderr)
    print(json.dumps({"gpu": summary}))


if __name__ == "__main__":
    main()
