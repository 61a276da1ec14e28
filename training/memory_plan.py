"""Will this job fit? A memory plan made before any weight is loaded.

From the model folder's ``config.json`` (its skeleton, training/plan_shape.py: derived from the config
alone for the families this worker serves, else built on the meta device) and its safetensors headers
(the exact bytes of every stored tensor, read from the first bytes of each file), counted per
parameter group:

- weights under the chosen quantization, counting what is really quantized: ``nn.Linear`` weights
  (never ``lm_head``) through bitsandbytes, and under 4-bit also the fused 3-D routed experts of a
  mixture-of-experts model (training/moe_quant.py quantizes them while loading: for
  Qwen3-Next-80B-A3B 97% of the weights), each at bitsandbytes' exact NF4 bytes with its
  quantization state; what stays unquantized is fp32 then (peft's k-bit preparation upcasts it);
- LoRA parameters with their gradients and AdamW state (fp32: 16 bytes a parameter; bf16 under
  QLoRA, where TRL casts the adapter to bf16: 8 bytes); on 4-bit experts only when named in
  target_modules ('auto' leaves them frozen) and the installed peft is the one
  training/expert_lora.py fixes (else refused);
- 4-bit experts are dequantized one layer at a time for the forward and backward pass: two
  layers' worth in 16 bits with gradient checkpointing, every layer's without; with LoRA on them
  also the adapted copy (W + BA) and its gradient, two more layers' worth;
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from errors import ModelError, TrainingError
from models.safetensors import SafetensorsError, read_weight_headers
from training.expert_lora import unsupported_reason
from training.moe_quant import nf4_bytes
from training.plan_shape import Shape, measure, model_skeleton
from training.runtime import (
    choose_checkpointing,
    choose_precision,
    choose_quantization,
    this_machine,
)
from training.skeleton import Skeleton
from training.targets import expert_lora_on_4bit_refusal

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
    # For comparison: every weight, experts included, in 4-bit.
    weight_bytes_if_all_4bit: int
    quantized_experts: bool  # the routed experts are 4-bit (loaded by training/moe_quant.py)
    expert_dequant_bytes: int  # 4-bit experts dequantized for forward and backward
    lora_parameters: int
    expert_lora_parameters: int  # of lora_parameters: on the routed experts
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
    expert_lora: str = ""  # what LoRA on the routed experts needs, in words ("" without routed experts)
    # After loading: what the model really holds against this plan (training/measured.py).
    measured: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gib"] = {k: round(getattr(self, k) / GiB, 2) for k in (
            "weight_bytes", "lora_bytes", "activation_bytes", "expert_dequant_bytes", "overhead_bytes",
            "per_device_bytes", "available_bytes")}
        out["groups_gib"] = {name: round(g.bytes / GiB, 3) for name, g in self.groups.items() if g.parameters}
        return out

    def summary(self) -> str:
        experts = self.groups.get("routed_experts")
        expert_note = ""
        if experts and experts.parameters:
            how = "in 4-bit" if self.quantized_experts else f"in {'16 bits' if self.precision != 'fp32' else 'fp32'}"
            expert_note = f", of which routed experts {experts.bytes / GiB:.1f} GiB {how}"
        per = "per GPU" if self.device == "cuda" else "of RAM"
        return (f"{self.model_type} needs about {self.per_device_bytes / GiB:.1f} GiB {per} "
                f"({self.strategy}, {self.quantization}): weights {self.weight_bytes / GiB:.1f} GiB"
                f"{expert_note}, LoRA with optimizer state {self.lora_bytes / GiB:.1f} GiB, activations "
                f"{self.activation_bytes / GiB:.1f} GiB, expert dequantization {self.expert_dequant_bytes / GiB:.1f} GiB, overhead {self.overhead_bytes / GiB:.1f} GiB; "
                f"{self.available_bytes / GiB:.1f} GiB usable")


# --------------------------------------------------------------------------------------------------
# reading the model without its weights


def stored_bytes(model_dir: Path) -> int:
    """Bytes of the stored weights, from the safetensors headers' data offsets; 0 without weights."""
    try:
        tensors = read_weight_headers(model_dir) or {}
    except SafetensorsError as exc:
        raise ModelError(f"{Path(model_dir).name}: {exc}; download the model again") from None
    return sum(t.end - t.start for t in tensors.values())


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
        return nf4_bytes(numel, double_quant=True)  # NF4 with double quantization (training/loading.py)
    if quantization == "8bit":
        return numel + 4 * rows  # int8 weights and one fp32 scale per output row
    raise ValueError(quantization)


# --------------------------------------------------------------------------------------------------
# the plan


def _weights(shape: Shape, quantization: str, precision: str) -> tuple[dict[str, Group], int]:
    groups = {g: Group() for g in GROUPS}
    # peft's k-bit preparation upcasts what a quantized load left in 16 bits to fp32
    dtype_bytes = DTYPE_BYTES[precision] if quantization == "none" else 4
    for name, numel, rows, kind in shape.parameters:
        group = groups[group_of(name)]
        group.parameters += numel
        if _quantized(kind, quantization):
            group.bytes += _quantized_bytes(numel, rows, quantization)
            group.quantized_parameters += numel
        else:
            group.bytes += numel * dtype_bytes
    return groups, sum(g.bytes for g in groups.values())


def _quantized(kind: str, quantization: str) -> bool:
    """Linear weights under 4- and 8-bit (bitsandbytes); routed experts under 4-bit (training/moe_quant.py)."""
    return (kind == "linear" and quantization != "none") or (kind == "expert" and quantization == "4bit")


def _lora_parameters(shape: Shape, quantization: str) -> int:
    """On 4-bit experts only when named: 'auto' then adapts everything but the experts."""
    return shape.lora_parameters + (shape.expert_lora_parameters if _experts_adapted(shape, quantization) else 0)


def _experts_adapted(shape: Shape, quantization: str) -> bool:
    return bool(shape.expert_lora_parameters) and (quantization != "4bit" or shape.explicit_expert_targets)


def _dequantized_experts(shape: Shape, quantization: str, precision: str, checkpointing: bool) -> int:
    """4-bit experts are dequantized for use: two layers at a time with checkpointing, else kept for backward.

    With LoRA on them, each use also makes the adapted copy W + BA (kept for backward without
    checkpointing) and, in backward, its gradient: both the size of the layer's experts in 16 bits
    (docs/moe-expert-quantization-research.md §5).
    """
    if quantization != "4bit" or not shape.expert_layer_elements:
        return 0
    layers = shape.expert_layer_elements
    kept = 2 * max(layers) if checkpointing else sum(layers) + max(layers)
    if _experts_adapted(shape, quantization):
        kept += 2 * max(layers) if checkpointing else sum(layers) + max(layers)
    return kept * DTYPE_BYTES[precision]


def _lora_bytes_per_parameter(quantization: str) -> int:
    return LORA_BYTES_PER_PARAMETER if quantization == "none" else QLORA_BYTES_PER_PARAMETER


def _activations(shape: Shape, tokens: int, precision: str, checkpointing: bool) -> int:
    dtype_bytes = DTYPE_BYTES[precision]
    logits = tokens * shape.vocab_size * LOGIT_BYTES_PER_ELEMENT
    if checkpointing:  # layer inputs only, and one layer recomputed at a time
        kept = len(shape.per_token_layer_elements) * shape.hidden_size + max(shape.per_token_layer_elements, default=0)
    else:
        kept = sum(shape.per_token_layer_elements)
    return tokens * kept * dtype_bytes + logits


def _fit(shape: Shape, *, quantization: str, precision: str, devices: list[int], cuda: bool,
         tokens: int, checkpointing: bool, shard: bool) -> tuple[Fit, dict]:
    groups, weight_bytes = _weights(shape, quantization, precision)
    lora_bytes = _lora_parameters(shape, quantization) * _lora_bytes_per_parameter(quantization)
    activations = _activations(shape, tokens, precision, checkpointing)
    dequant = _dequantized_experts(shape, quantization, precision, checkpointing)
    overhead = CUDA_OVERHEAD_BYTES if cuda else 0
    n = len(devices) if shard else 1
    per_device = (weight_bytes + lora_bytes) // n + activations + dequant + overhead
    if shard and n > 1:
        per_device += max((b for _, b in _layer_bytes(shape, quantization, precision)), default=0)  # one gathered layer
    strategy = "cpu" if not cuda else ("fsdp" if shard and n > 1 else ("ddp" if len(devices) > 1 else "single"))
    available = int(min(devices) * USABLE_FRACTION) if devices else 0
    fit = Fit(quantization, strategy, len(devices), per_device, available)
    return fit, {"groups": groups, "weight_bytes": weight_bytes, "lora_bytes": lora_bytes,
                 "activation_bytes": activations, "overhead_bytes": overhead, "expert_dequant_bytes": dequant}


def _layer_bytes(shape: Shape, quantization: str, precision: str):
    per_layer: dict[str, int] = {}
    for name, numel, rows, kind in shape.parameters:
        match = re.search(r"layers\.(\d+)\.", name)
        if match:
            size = (_quantized_bytes(numel, rows, quantization) if _quantized(kind, quantization)
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
                trust_remote_code: bool = False, skeleton: Skeleton | None = None) -> MemoryPlan:
    """The memory plan of training ``hp`` on the model in ``model_dir`` on these devices.

    ``cuda``/``devices`` default to this machine; pass them to plan for another one (assumed to have
    bf16, as every current data-center GPU does). Precision, quantization and gradient checkpointing
    follow training/runtime.py's rules, the ones training loads with. Nothing is raised for a job
    that does not fit: see ``require_fit``. ``skeleton`` saves reading the config again when one
    model is planned several ways.
    """
    bf16 = True
    if cuda is None or devices is None:
        cuda, devices = detect_devices()
        bf16 = this_machine()[1]
    precision = choose_precision(cuda, bf16)
    model_dir = Path(model_dir)
    stored = stored_bytes(model_dir)
    skeleton = skeleton if skeleton is not None else model_skeleton(model_dir, trust_remote_code)
    shape = measure(skeleton, hp.lora_r, hp.target_modules, stored)
    checkpointing = choose_checkpointing(hp.gradient_checkpointing, cuda)
    tokens = hp.batch_size * hp.max_seq_length

    def attempt(quantization: str, *, shard: bool, tokens: int = tokens, checkpointing: bool = checkpointing,
                shape: Shape = shape):
        return _fit(shape, quantization=quantization, precision=precision, devices=devices, cuda=cuda,
                    tokens=tokens, checkpointing=checkpointing, shard=shard)

    refusal = expert_lora_on_4bit_refusal(list(shape.expert_targets)) if (
        shape.explicit_expert_targets and shape.expert_layer_elements) else None
    if hp.quantization == "4bit" and refusal is not None:
        raise refusal
    if hp.quantization != "auto":
        candidates = [(hp.quantization, False)] + ([(hp.quantization, True)] if cuda and len(devices) > 1
                                                   and hp.quantization == "none" else [])
    elif cuda:
        candidates = [("none", False)] + ([("none", True)] if len(devices) > 1 else [])
        if refusal is None:  # expert LoRA on 4-bit experts needs training/expert_lora.py's peft
            candidates.append(("4bit", False))
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
        quantized_experts=fit.quantization == "4bit" and bool(shape.expert_layer_elements),
        expert_dequant_bytes=parts["expert_dequant_bytes"],
        lora_parameters=_lora_parameters(shape, fit.quantization),
        expert_lora_parameters=_lora_parameters(shape, fit.quantization) - shape.lora_parameters,
        lora_bytes=parts["lora_bytes"], activation_bytes=parts["activation_bytes"],
        activation_bytes_without_checkpointing=_activations(shape, tokens, precision, False),
        activation_bytes_with_checkpointing=_activations(shape, tokens, precision, True),
        gradient_checkpointing=checkpointing, overhead_bytes=parts["overhead_bytes"],
        per_device_bytes=fit.per_device_bytes, available_bytes=fit.available_bytes, fits=fit.fits,
    )
    if not plan.fits:
        plan.alternatives = _alternatives(shape, hp, attempt, devices, cuda, checkpointing)
    plan.expert_lora = _expert_lora_needs(shape, attempt, devices, cuda)
    return plan


def _expert_lora_needs(shape: Shape, attempt, devices: list[int], cuda: bool) -> str:
    """What LoRA on the routed experts takes, in 4-bit (when the installed peft allows it) and in 16 bits."""
    if not shape.expert_layer_elements:
        return ""
    if not shape.expert_lora_parameters:
        return ("LoRA on the routed experts: not requested (list 'mlp.experts.gate_up_proj' and "
                "'mlp.experts.down_proj' in target_modules)")
    named = replace(shape, explicit_expert_targets=True)  # what naming the experts would add under 4-bit
    words = f"LoRA on the routed experts ({shape.expert_lora_parameters / 1e9:.2f} B parameters)"
    reason = unsupported_reason()
    if reason is None:
        fit, parts = attempt("4bit", shard=False, shape=named)
        words += (f" with the experts in 4-bit: {fit.per_device_bytes / GiB:.0f} GiB on one device "
                  f"(LoRA with optimizer state {parts['lora_bytes'] / GiB:.1f} GiB, expert dequantization "
                  f"{parts['expert_dequant_bytes'] / GiB:.1f} GiB), "
                  + ("fits here" if fit.fits else f"needs a GPU of at least {_gpu_for(fit):.0f} GiB") + "; ")
    else:
        words += f" needs the experts in 16 bits ({reason}): "
    fit, parts = attempt("none", shard=False, shape=named)
    words += f"in 16 bits {fit.per_device_bytes / GiB:.0f} GiB on one device"
    size = min(devices) if devices else 0
    usable = size * USABLE_FRACTION
    fixed = parts["activation_bytes"] + parts["overhead_bytes"] + max(
        (b for _, b in _layer_bytes(shape, "none", "bf16")), default=0)
    if cuda and not fit.fits and usable > fixed:
        n = max(2, math.ceil((parts["weight_bytes"] + parts["lora_bytes"]) / (usable - fixed)))
        words += f", or {n} GPUs of {size / GiB:.0f} GiB with FSDP"
    return words + (" (fits here)" if fit.fits else "")


def _gpu_for(fit: Fit) -> float:
    """The smallest GPU, in GiB, whose usable part holds this fit."""
    return math.ceil(fit.per_device_bytes / USABLE_FRACTION / GiB)


def _alternatives(shape: Shape, hp, attempt, devices: list[int], cuda: bool, checkpointing: bool) -> list[str]:
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
                frozen = (" with the routed experts in 4-bit" + ("" if _experts_adapted(shape, q) else " and frozen")
                          if shape.expert_layer_elements else "")
                out.append(f"quantization '4bit'{frozen} ({fit.per_device_bytes / GiB:.0f} GiB per GPU)")
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


# --------------------------------------------------------------------------------------------------
# after loading: the plan against what the model really holds

MEASURED_TOLERANCE = 0.10


def measure_loaded(model) -> dict[str, Any]:
    """Bytes the loaded model holds by dtype and by the plan's groups (quantization state included)."""
    from training.moe_quant import measure_model

    return measure_model(model, group_of)


def compare_measured(plan: MemoryPlan, measured: dict[str, Any], log=None) -> dict[str, Any]:
    """``measured`` beside the plan's weights, group by group; a difference over 10% is flagged and logged.

    The plan counts parameters; the model also holds buffers (rotary tables), counted in their group.
    """
    planned = {name: g.bytes for name, g in plan.groups.items()}
    got = measured.get("bytes_by_group", {})
    groups, off = {}, []
    for name in sorted(set(planned) | set(got)):
        p, m = planned.get(name, 0), got.get(name, 0)
        if not p and not m:
            continue
        ratio = m / p if p else None
        groups[name] = {"planned_bytes": p, "measured_bytes": m, "ratio": round(ratio, 4) if ratio else None}
        if ratio is None or abs(ratio - 1) > MEASURED_TOLERANCE:
            off.append(name)
    total = measured.get("total_bytes", 0)
    ratio = total / plan.weight_bytes if plan.weight_bytes else None
    if ratio is None or abs(ratio - 1) > MEASURED_TOLERANCE:
        off.insert(0, "total")
    out = {**measured, "planned_weight_bytes": plan.weight_bytes, "ratio": round(ratio, 4) if ratio else None,
           "groups": groups, "within_tolerance": not off, "differs": off}
    if off and log is not None:
        log.warning("the loaded model differs from the memory plan by more than %d%% in %s: measured %.3f GiB, "
                    "planned %.3f GiB", int(MEASURED_TOLERANCE * 100), ", ".join(off), total / GiB,
                    plan.weight_bytes / GiB)
    return out
