"""The GPU section's results as Markdown, for BENCHMARKS.md (bench/gpu.py writes it beside its JSON)."""

from __future__ import annotations

# (key in the results, what the row is)
ARMS = (
    ("padded_sdpa", "Trainer + PEFT, padded (baseline)"),
    ("padded_flash_attention_2", "Trainer + PEFT, padded, flash attention"),
    ("worker_padding_free", "worker (`handler.handler`), padding-free"),
    ("worker_padded", "worker (`handler.handler`), padded"),
)
PART_OF_ARM = {"padded_sdpa": "padded_sdpa", "padded_flash_attention_2": "padded_flash_attention_2",
               "worker_padding_free": "worker", "worker_padded": "worker"}


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _header(result: dict) -> list[str]:
    m = result.get("machine", {})
    versions = ", ".join(f"{name} {m[name]}" for name in ("torch", "transformers", "peft", "trl", "accelerate",
                                                           "flash-attn") if m.get(name))
    model = result.get("model")
    lines = [f"Command: `{result['command']}` — {_fmt(result.get('seconds'))} s of a {result['budget_s']:.0f} s budget",
             "",
             f"Card: {result.get('card') or m.get('nvidia_smi_name') or result['device']}; driver "
             f"{m.get('driver') or '—'}; CUDA {m.get('cuda') or '—'}; Python {m.get('python')}; {versions}."]
    if model:
        setup = result["setup"]
        lines += ["", f"Model: Llama, {model['layers']} layers, hidden {model['hidden_size']}, "
                      f"{_count(model['parameters'])} parameters (random, {setup['precision']}, "
                      f"{model['bytes'] / 2**30:.2f} GiB saved; built in {model['build_s']} s, saved in "
                      f"{model['save_s']} s). LoRA r {setup['lora_r']} / alpha {setup['lora_alpha']} on every "
                      f"projection ({_count(model['lora_parameters'])}). One epoch of {setup['examples']} "
                      f"long-tailed chat examples, {setup['batch_size']} a batch, max_seq_length "
                      f"{setup['max_seq_length']}, no gradient checkpointing; each timed epoch after a "
                      f"{setup['warmup_steps']}-step warm-up in the same process."]
        peak = result.get("peak")
        lines += ["", f"MFU = FLOPs ÷ (train seconds × {peak['bf16_dense_tflops']} TFLOPS, the {peak['card']}'s "
                      f"dense bf16 peak: {peak['source']}); FLOPs = {result['flops_formula']}."
                  if peak else f"MFU: null — {result.get('mfu_null_reason')}. FLOPs = {result['flops_formula']}."]
    return lines


def _arm_rows(result: dict) -> list[str]:
    lines = ["| arm | attention | batching | real tokens | train s | real tok/s | vs padded (sdpa) | TFLOPs | MFU "
             "| peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    arms = result.get("arms", {})
    for key, label in ARMS:
        arm = arms.get(key)
        if arm is None:
            status = result.get("parts", {}).get(PART_OF_ARM[key], {}).get("status", "not run")
            lines.append(f"| {label} | {status} | | | | | | | | |")
            continue
        lines.append(f"| {label} | {arm['attention']} | {arm['batching']} | {_fmt(arm['tokens'])} | "
                     f"{_fmt(arm['train_s'], 2)} | {_fmt(arm['tokens_per_second'], 0)} | "
                     f"{_fmt(arm.get('vs_padded_sdpa'), 2)} | {_fmt(arm['tflops'], 1)} | "
                     f"{_fmt(None if arm['mfu'] is None else arm['mfu'] * 100, 1, '%')} | "
                     f"{_fmt(arm.get('peak_gpu_gib'), 1)} |")
    return lines


def _warm_rows(warm: dict | None) -> list[str]:
    if not warm:
        return []
    lines = ["", "Warm worker (same base, same process): the second job's load against the first's.", "",
             "| job | `base_model.load.reused` | `load_s` | outside training (total − train) s |", "|---|---|---|---|",
             f"| first (cold; 2-step warm-up) | {warm['first_job_reused']} | {_fmt(warm['first_job_load_s'], 3)} | "
             f"{_fmt(warm['first_job_outside_train_s'], 2)} |"]
    if "second_job_load_s" in warm:
        lines.append(f"| second (padding-free epoch) | {warm['second_job_reused']} | "
                     f"{_fmt(warm['second_job_load_s'], 3)} | {_fmt(warm['second_job_outside_train_s'], 2)} |")
        lines += ["", f"second ÷ first load: {_fmt(warm['second_vs_first_load'], 4)} (issue 12's target ≤ 0.05)."]
    return lines


def markdown(result: dict) -> str:
    if "skipped" in result:
        return f"GPU section skipped: {result['skipped']}\n"
    lines = _header(result) + [""] + _arm_rows(result) + _warm_rows(result.get("warm_load"))
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    for part, row in result.get("parts", {}).items():
        lines.append(f"| {part} | {row['status']} | {_fmt(row.get('seconds'))} |")
    return "\n".join(lines) + "\n"
