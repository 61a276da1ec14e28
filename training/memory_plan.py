"""Will this job fit? A memory plan made before any weight is loaded.

From the model folder's ``config.json`` (the model is built on the meta device: module types and the
shapes parameters really have in memory, no storage) and its safetensors headers (dtype and shape of
every stored tensor, read from the first bytes of each file), counted per parameter group:

- weights under the chosen quantization, counting what bitsandbytes really quantizes: only
  ``nn.Linear`` weights (never ``lm_head``). transformers 5 fuses a mixture-of-experts layer's routed
  experts into 3-D parameters, which bitsandbytes leaves in the compute dtype: for
  Qwen3-Next-80B-A3B that is 97% of the weights, so "4-bit" barely shrinks it;
- LoRA parameters with their gradients and AdamW state (fp32: 16 bytes a parameter; bf16 under
  QLoRA, where TRL casts the adapter to bf16: 8 bytes);
- activations for one micro-batch (batch_size × max_seq_length), with and without gradient
  checkpointing, and the logits;
- a fixed CUDA context and allocator margin;

against the GPUs present (or the RAM of a CPU worker). ``auto`` quantization picks none when the
model fits in 16 bits, else 4-bit if that fits. A job that fits nowhere fails in seconds with the
figures and what would fit (more GPUs with FSDP, 4-bit, shorter sequences, a smaller batch).
The activation figure is an estimate (saved inputs and outputs of every projection), not a bound.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from errors import ModelError, TrainingError
from models.safetensors import SAFETENSORS_BYTES, safetensors_headers
from training.runtime import (
    choose_checkpointing,
    choose_precision,
    choose_quantization,
    this_machine,
)
from training.targets import resolve_targets

GiB = 1024**3
LORA_BYTES_PER_PARAMETER = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
# TRL casts the adapter of a quantized model to bf16 (as the QLoRA paper does): weight, gradient and
# AdamW's moments then take 2 bytes each.
QLORA_BYTES_PER_PARAMETER = 8
CUDA_OVERHEAD_BYTES = int(1.5 * GiB)  # CUDA context, cuBLAS workspaces, allocator slack
USABLE_FRACTION = 0.92  # fragmentation: never plan to the last byte
LOGIT_BYTES_PER_ELEMENT = 10  # bf16 logits, their fp32 upcast for the loss, and the fp32 gradient
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GROUPS = ("routed_experts", "shared_experts", "routers", "attention", "linear_attention", "mlp",
          "embeddings", "norms_and_other")


@dataclass
class Group:
    parameters: int = 0
    bytes: int = 0
    quantized_parameters: int = 0


@dataclass
class Fit:
    """One way to run the job: its figures per device and whether they fit."""

    quantization: str
    strategy: str  # single | ddp | fsdp | cpu
    devices: int
    per_device_bytes: int
    available_bytes: int

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.available_bytes


@dataclass
class MemoryPlan:
    model_type: str
    precision: str
    quantization: str  # what the job will use (auto resolved)
    strategy: str
    device: str  # cuda | cpu
    device_bytes: list[int]
    parameters: int
    stored_bytes: int  # the safetensors files (0 when only a config was given)
    groups: dict[str, Group]
    weight_bytes: int
    # For comparison: every weight, experts included, in 4-bit (what bitsandbytes does not offer).
    weight_bytes_if_all_4bit: int
    lora_parameters: int
    lora_bytes: int
    activation_bytes: int
    activation_bytes_without_checkpointing: int
    activation_bytes_with_checkpointing: int
    gradient_checkpointing: bool
    overhead_bytes: int
    per_device_bytes: int
    available_bytes: int
    fits: bool
    alternatives: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gib"] = {k: round(getattr(self, k) / GiB, 2) for k in (
            "weight_bytes", "lora_bytes", "activation_bytes", "overhead_bytes", "per_device_bytes",
            "available_bytes")}
        return out

    def summary(self) -> str:
        experts = self.groups.get("routed_experts")
        expert_note = ""
        if experts and experts.parameters and self.quantization != "none":
            expert_note = (f", of which {experts.bytes / GiB:.1f} GiB are fused routed experts that "
                           "bitsandbytes does not quantize")
        per = "per GPU" if self.device == "cuda" else "of RAM"
        return (f"{self.model_type} needs about {self.per_device_bytes / GiB:.1f} GiB {per} "
                f"({self.strategy}, {self.quantization}): weights {self.weight_bytes / GiB:.1f} GiB"
                f"{expert_note}, LoRA with optimizer state {self.lora_bytes / GiB:.1f} GiB, activations "
                f"{self.activation_bytes / GiB:.1f} GiB, overhead {self.overhead_bytes / GiB:.1f} GiB; "
                f"{self.available_bytes / GiB:.1f} GiB usable")


# --------------------------------------------------------------------------------------------------
# reading the model without its weights


def meta_model(model_dir: Path, trust_remote_code: bool = False):
    """The model built on the meta device from its config: real module types and shapes, no storage."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not read the model's config in {model_dir} to plan memory: {exc}") from exc


def group_of(name: str) -> str:
    if re.search(r"(^|\.)(embed_tokens|lm_head|wte|wpe|embed_out)\.", name):
        return "embeddings"
    if re.search(r"\.(gate|router|shared_expert_gate)\.weight$", name) or ".router." in name:
        return "routers"
    if ".shared_expert." in name or ".shared_experts." in name:
        return "shared_experts"
    if ".experts." in name:
        return "routed_experts"
    if ".linear_attn." in name:
        return "linear_attention"
    if ".self_attn." in name or ".attention." in name:
        return "attention"
    if ".mlp." in name or ".feed_forward." in name:
        return "mlp"
    return "norms_and_other"


def _quantized_bytes(numel: int, rows: int, quantization: str) -> int:
    if quantization == "4bit":
        # NF4: two weights a byte; double quantization: one uint8 absmax per 64 weights and one
        # fp32 absmax per 256 of those.
        return math.ceil(numel / 2) + math.ceil(numel / 64) + 4 * math.ceil(numel / (64 * 256))
    if quantization == "8bit":
        return numel + 4 * rows  # int8 weights and one fp32 scale per output row
    raise ValueError(quantization)


# --------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class _Shape:
    """What the plan needs from the model, measured once and reused for every alternative."""

    model_type: str
    parameters: list[tuple[str, int, int, bool]]  # name, numel, rows, quantizable
    lora_parameters: int
    expert_lora_parameters: int
    per_token_layer_elements: list[int]  # activation elements saved per token, per decoder layer
    hidden_size: int
    vocab_size: int
    stored_bytes: int


def _measure(model, lora_r: int, target_modules, stored_bytes: int) -> _Shape:
    import torch.nn as nn

    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    params = []
    for name, param in model.named_parameters():
        quantizable = name in linear_weights and not name.startswith("lm_head")
        rows = param.shape[0] if param.ndim >= 1 else 1
        params.append((name, param.numel(), rows, quantizable))

    targets = resolve_targets(model, target_modules)
    lora = experts_lora = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in targets.modules:
            lora += lora_r * (module.in_features + module.out_features)
    for name, param in model.named_parameters():
        if param.ndim == 3 and any(name.endswith(p) for p in targets.parameters):
            experts, a, b = param.shape
            lora += experts * lora_r * (a + b)
            experts_lora += experts * lora_r * (a + b)

    config = model.config.get_text_config()
    top_k = getattr(config, "num_experts_per_tok", 1) or 1
    layers = [m for n, m in model.named_modules() if re.fullmatch(r".*layers\.\d+", n)]
    per_layer = []
    for layer in layers:
        # Each projection keeps its input for the backward pass and produces an output; routed
        # experts see top_k copies of every token. Plus norms and residuals: 4 × hidden.
        elements = 4 * config.hidden_size
        for sub_name, sub in layer.named_modules():
            if isinstance(sub, nn.Linear):
                elements += sub.in_features + sub.out_features
        for sub_name, param in layer.named_parameters():
            if param.ndim == 3 and ".experts." in f".{sub_name}":
                elements += top_k * (param.shape[1] + param.shape[2])
        per_layer.append(elements)
    return _Shape(config.model_type, params, lora, experts_lora, per_layer, config.hidden_size, config.vocab_size,
                  stored_bytes)


def _weights(shape: _Shape, quantization: str, precision: str) -> tuple[dict[str, Group], int]:
    groups = {g: Group() for g in GROUPS}
    dtype_bytes = DTYPE_BYTES[precision]
    for name, numel, rows, quantizable in shape.parameters:
        group = groups[group_of(name)]
        group.parameters += numel
        if quantization != "none" and quantizable:
            group.bytes += _quantized_bytes(numel, rows, quantization)
            group.quantized_parameters += numel
        else:
            group.bytes += numel * dtype_bytes
    return groups, sum(g.bytes for g in groups.values())


def _lora_bytes_per_parameter(quantization: str) -> int:
    return LORA_BYTES_PER_PARAMETER if quantization == "none" else QLORA_BYTES_PER_PARAMETER


def _activations(shape: _Shape, tokens: int, precision: str, checkpointing: bool) -> int:
    dtype_bytes = DTYPE_BYTES[precision]
    logits = tokens * shape.vocab_size * LOGIT_BYTES_PER_ELEMENT
    if checkpointing:  # layer inputs only, and one layer recomputed at a time
        kept = len(shape.per_token_layer_elements) * shape.hidden_size + max(shape.per_token_layer_elements, default=0)
    else:
        kept = sum(shape.per_token_layer_elements)
    return tokens * kept * dtype_bytes + logits


def _fit(shape: _Shape, *, quantization: str, precision: str, devices: list[int], cuda: bool,
         tokens: int, checkpointing: bool, shard: bool) -> tuple[Fit, dict]:
    groups, weight_bytes = _weights(shape, quantization, precision)
    lora_bytes = shape.lora_parameters * _lora_bytes_per_parameter(quantization)
    activations = _activations(shape, tokens, precision, checkpointing)
    overhead = CUDA_OVERHEAD_BYTES if cuda else 0
    n = len(devices) if shard else 1
    per_device = (weight_bytes + lora_bytes) // n + activations + overhead
    if shard and n > 1:
        per_device += max((b for _, b in _layer_bytes(shape, quantization, precision)), default=0)  # one gathered layer
    strategy = "cpu" if not cuda else ("fsdp" if shard and n > 1 else ("ddp" if len(devices) > 1 else "single"))
    available = int(min(devices) * USABLE_FRACTION) if devices else 0
    fit = Fit(quantization, strategy, len(devices), per_device, available)
    return fit, {"groups": groups, "weight_bytes": weight_bytes, "lora_bytes": lora_bytes,
                 "activation_bytes": activations, "overhead_bytes": overhead}


def _layer_bytes(shape: _Shape, quantization: str, precision: str):
    per_layer: dict[str, int] = {}
    for name, numel, rows, quantizable in shape.parameters:
        match = re.search(r"layers\.(\d+)\.", name)
        if match:
            size = (_quantized_bytes(numel, rows, quantization) if quantization != "none" and quantizable
                    else numel * DTYPE_BYTES[precision])
            per_layer[match.group(1)] = per_layer.get(match.group(1), 0) + size
    return per_layer.items()


def detect_devices() -> tuple[bool, list[int]]:
    """(cuda, bytes of each GPU) or (False, [RAM bytes]) on a CPU worker."""
    import torch

    if torch.cuda.is_available():
        return True, [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return False, [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]


def plan_memory(model_dir: str | Path, hp, *, cuda: bool | None = None, devices: list[int] | None = None,
                trust_remote_code: bool = False, model=None) -> MemoryPlan:
    """The memory plan of training ``hp`` on the model in ``model_dir`` on these devices.

    ``cuda``/``devices`` default to this machine; pass them to plan for another one (assumed to have
    bf16, as every current data-center GPU does). Precision, quantization and gradient checkpointing
    follow training/runtime.py's rules, the ones training loads with. Nothing is raised for a job
    that does not fit: see ``require_fit``.
    """
    bf16 = True
    if cuda is None or devices is None:
        cuda, devices = detect_devices()
        bf16 = this_machine()[1]
    precision = choose_precision(cuda, bf16)
    model_dir = Path(model_dir)
    headers = safetensors_headers(model_dir)
    stored = sum(SAFETENSORS_BYTES.get(dtype, 2) * math.prod(shape) for dtype, shape in headers.values())
    model = model if model is not None else meta_model(model_dir, trust_remote_code)
    shape = _measure(model, hp.lora_r, hp.target_modules, stored)
    checkpointing = choose_checkpointing(hp.gradient_checkpointing, cuda)
    tokens = hp.batch_size * hp.max_seq_length

    def attempt(quantization: str, *, shard: bool, tokens: int = tokens, checkpointing: bool = checkpointing):
        return _fit(shape, quantization=quantization, precision=precision, devices=devices, cuda=cuda,
                    tokens=tokens, checkpointing=checkpointing, shard=shard)

    if hp.quantization != "auto":
        candidates = [(hp.quantization, False)] + ([(hp.quantization, True)] if cuda and len(devices) > 1
                                                   and hp.quantization == "none" else [])
    elif cuda:
        candidates = [("none", False)] + ([("none", True)] if len(devices) > 1 else []) + [("4bit", False)]
    else:
        candidates = [(choose_quantization("auto", False, None), False)]
    chosen = None
    for quantization, shard in candidates:
        fit, parts = attempt(quantization, shard=shard)
        if fit.fits:
            chosen = (fit, parts)
            break
    if chosen is None:
        chosen = attempt(candidates[0][0], shard=candidates[0][1])
    fit, parts = chosen

    plan = MemoryPlan(
        model_type=shape.model_type, precision=precision, quantization=fit.quantization,
        strategy=fit.strategy, device="cuda" if cuda else "cpu", device_bytes=list(devices),
        parameters=sum(p[1] for p in shape.parameters), stored_bytes=stored, groups=parts["groups"],
        weight_bytes=parts["weight_bytes"],
        weight_bytes_if_all_4bit=sum(_quantized_bytes(p[1], p[2], "4bit") for p in shape.parameters),
        lora_parameters=shape.lora_parameters,
        lora_bytes=parts["lora_bytes"], activation_bytes=parts["activation_bytes"],
        activation_bytes_without_checkpointing=_activations(shape, tokens, precision, False),
        activation_bytes_with_checkpointing=_activations(shape, tokens, precision, True),
        gradient_checkpointing=checkpointing, overhead_bytes=parts["overhead_bytes"],
        per_device_bytes=fit.per_device_bytes, available_bytes=fit.available_bytes, fits=fit.fits,
    )
    if not plan.fits:
        plan.alternatives = _alternatives(shape, hp, attempt, devices, cuda, checkpointing)
    return plan


def _alternatives(shape: _Shape, hp, attempt, devices: list[int], cuda: bool, checkpointing: bool) -> list[str]:
    """What would fit, in words: more GPUs, 4-bit, gradient checkpointing, shorter rows, a smaller batch."""
    out = []
    size = min(devices) if devices else 0
    base_q = "none" if hp.quantization == "auto" else hp.quantization
    if cuda:
        for q in ("none", "4bit"):
            fit, parts = attempt(q, shard=False)
            # Sharded over n GPUs of this size: weights and LoRA state divide, activations do not.
            fixed = parts["activation_bytes"] + parts["overhead_bytes"]
            spread = parts["weight_bytes"] + parts["lora_bytes"]
            usable = size * USABLE_FRACTION
            if usable > fixed and q == "none":
                n = max(2, math.ceil(spread / (usable - fixed)))
                if n > len(devices) and n <= 64:
                    out.append(f"{n} GPUs of {size / GiB:.0f} GiB with FSDP in {'bf16' if q == 'none' else q} "
                               f"(about {(spread / n + fixed) / GiB:.0f} GiB each)")
            if q == "4bit" and fit.fits and hp.quantization != "4bit":
                out.append(f"quantization '4bit' ({fit.per_device_bytes / GiB:.0f} GiB per GPU)")
    if not checkpointing:
        fit, _ = attempt(base_q, shard=False, checkpointing=True)
        if fit.fits:
            out.append("gradient_checkpointing true")
    length = hp.max_seq_length
    while length > 256:
        length //= 2
        fit, _ = attempt(base_q, shard=False, tokens=hp.batch_size * length)
        if fit.fits:
            out.append(f"max_seq_length {length}")
            break
    if hp.target_modules == "auto" and shape.expert_lora_parameters:
        fit, parts = attempt(base_q, shard=False)
        saved = shape.expert_lora_parameters * _lora_bytes_per_parameter(base_q)
        if fit.per_device_bytes - saved <= fit.available_bytes:
            out.append(f"target_modules 'all-linear' (no LoRA on the routed experts: {saved / GiB:.0f} GiB less)")
    if hp.batch_size > 1:
        fit, _ = attempt(base_q, shard=False, tokens=hp.max_seq_length)
        if fit.fits:
            out.append("batch_size 1 (raise gradient_accumulation_steps to keep the effective batch)")
    return out


def require_fit(plan: MemoryPlan) -> None:
    """Fail in seconds, with the figures and what would fit, instead of out of memory after a load."""
    if plan.fits:
        return
    where = (f"{len(plan.device_bytes)} GPU(s) of {min(plan.device_bytes) / GiB:.0f} GiB"
             if plan.device == "cuda" else f"{plan.device_bytes[0] / GiB:.0f} GiB of RAM (no GPU)")
    hint = ("; what would fit: " + "; ".join(plan.alternatives)) if plan.alternatives else (
        "; nothing on this worker would: use a larger GPU")
    raise TrainingError(f"this job does not fit on {where}: {plan.summary()}{hint}")
