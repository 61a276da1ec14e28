"""Qwen3-Next-80B-A3B's memory, proved on a shape twin instead of 160 GB of weights.

    .venv/bin/python bench/moe_shape_twin.py [--layers 2] [--experts 32] [--out DIR] [--device cpu|cuda]

Builds a Qwen3-Next with the 80B's real shapes (hidden 2048, experts of width 512, 16/2 attention heads
of 256, linear attention 16/32 heads of 128, vocabulary 151,936) but ``--layers`` of its 48 layers
(one linear-attention and one full-attention layer with the default 2) and ``--experts`` of its 512
routed experts (every byte of an expert layer is linear in the count: 512 on a GPU, fewer on a CPU,
where bitsandbytes' quantizer needs ~7× a tensor's bf16 size in fp32 temporaries), random bf16
weights saved as safetensors. Then, in a fresh process, it loads the twin through the worker's own
path (``training.loading.load_base_model`` with quantization 4bit) and reports:

- the loaded bytes by group, measured (``measure_loaded``) against the plan (``plan_memory``);
- bytes per layer kind, extrapolated to the 80B (36 linear-attention + 12 full-attention layers,
  512 experts), beside the config-only plan of the 80B;
- load seconds and peak resident memory while loading (``ru_maxrss`` above the process before);
- on ``--device cuda``: ``torch.cuda.max_memory_allocated`` after loading and for ``--steps``
  LoRA training steps (attention, linear attention and shared expert; experts frozen in 4-bit) on
  random tokens, and tokens/s.

JSON on stdout; figures in BENCHMARKS.md. Keep torch at one thread on a shared CPU (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.tiny_models import QWEN3_NEXT_80B  # noqa: E402  (the 80B's published shape)

REAL_LAYERS = {"linear_attention": 36, "full_attention": 12}
REAL_EXPERTS = 512
GiB = 1024**3


def twin_config(layers: int, experts: int):
    import transformers

    kinds = (["linear_attention", "full_attention"] * layers)[:layers]
    return transformers.Qwen3NextConfig(**{**QWEN3_NEXT_80B, "num_hidden_layers": layers,
                                           "num_experts": experts, "num_experts_per_tok": min(10, experts)},
                                        layer_types=kinds)


def build_twin(out: Path, layers: int, experts: int, seed: int = 0) -> Path:
    """The twin's folder (config.json + bf16 safetensors), built once."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(twin_config(layers, experts), dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    del model
    os.replace(tmp, out)
    return out


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(folder: Path, device: str, steps: int) -> dict:
    """In this (fresh) process: load the twin the worker's way and measure it against the plan."""
    import torch

    from config.job import TrainingJob
    from training.loading import load_base_model
    from training.memory_plan import compare_measured, measure_loaded, plan_memory
    from training.runtime import Runtime

    torch.set_num_threads(1)
    cuda = device == "cuda"
    hp = TrainingJob.from_payload({"dataset": "d.jsonl", "hyperparameters": {
        "quantization": "4bit", "batch_size": 1, "max_seq_length": 512}}).hyperparameters
    devices = [torch.cuda.get_device_properties(0).total_memory] if cuda else [64 * GiB]
    plan = plan_memory(folder, hp, cuda=cuda, devices=devices)
    runtime = Runtime(device, "bf16" if cuda else "fp32", "4bit", cuda)
    before = _rss_kib()
    started = time.monotonic()
    model = load_base_model(folder, runtime)
    out = {"device": device, "load_seconds": round(time.monotonic() - started, 1),
           "peak_rss_while_loading_gib": round((_rss_kib() - before) / 1024**2, 3),
           "rss_before_load_gib": round(before / 1024**2, 3),
           "measured": compare_measured(plan, measure_loaded(model))}
    if cuda:
        out["cuda_max_allocated_after_load_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        out.update(_train_steps(model, steps, hp.max_seq_length))
    return out


def _train_steps(model, steps: int, length: int) -> dict:
    """A few LoRA steps on random tokens, the worker's targets (experts frozen in 4-bit)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from training.peft_setup import targets_as_written, verify_adapted
    from training.targets import resolve_targets

    targets = resolve_targets(model, "auto", quantized_experts=True)
    with targets_as_written():
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets.modules,
                                                 task_type="CAUSAL_LM"))
    verify_adapted(model, targets)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.monotonic()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    seconds = time.monotonic() - started
    return {"train_steps": steps, "tokens_per_second": round(steps * length / seconds, 1),
            "cuda_max_allocated_training_gib": round(torch.cuda.max_memory_allocated() / GiB, 3)}


def extrapolate(result: dict, layers: int, experts: int) -> dict:
    """Per layer kind and per expert, scaled to the 80B; beside the config-only plan of the 80B."""
    from config.job import TrainingJob
    from training.memory_plan import plan_memory

    groups = result["measured"]["bytes_by_group"]
    kinds = (["linear_attention", "full_attention"] * layers)[:layers]
    per_layer_experts = groups.get("routed_experts", 0) / layers * REAL_EXPERTS / experts
    folder = Path(tempfile.mkdtemp(prefix="qwen3-next-80b-config."))
    twin_config(48, REAL_EXPERTS).__class__(**QWEN3_NEXT_80B).save_pretrained(folder)
    hp = TrainingJob.from_payload({"dataset": "d.jsonl", "hyperparameters": {"quantization": "4bit"}}).hyperparameters
    plan = plan_memory(folder, hp, cuda=True, devices=[80 * GiB])
    return {
        "twin_layers": kinds, "twin_experts": experts,
        "routed_experts_per_layer_at_512_gib": round(per_layer_experts / GiB, 4),
        "routed_experts_48_layers_gib": round(48 * per_layer_experts / GiB, 2),
        "plan_80b_routed_experts_gib": round(plan.groups["routed_experts"].bytes / GiB, 2),
        "plan_80b_weights_gib": round(plan.weight_bytes / GiB, 2),
        "plan_80b_per_device_gib": round(plan.per_device_bytes / GiB, 2),
        "layer_kinds_in_80b": REAL_LAYERS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32, help="512 is the real count (use it on a GPU)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "qwen3-next-shape-twin")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="training steps on a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while building the twin (1 on a shared CPU; all of a GPU machine's)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = parser.parse_args()
    folder = args.out / f"layers{args.layers}-experts{args.experts}"
    if args.measure:
        print(json.dumps(measure(folder, args.device, args.steps)))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build_twin(folder, args.layers, args.experts)
    built = round(time.monotonic() - started, 1)
    done = subprocess.run([sys.executable, __file__, "--measure", "--layers", str(args.layers), "--experts",
                           str(args.experts), "--out", str(args.out), "--device", args.device,
                           "--steps", str(args.steps)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(json.dumps({"twin": str(folder), "build_seconds": built, "stored_gib": round(stored / GiB, 3),
                      **result, "extrapolated": extrapolate(result, args.layers, args.experts)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
