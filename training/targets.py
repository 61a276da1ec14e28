"""What LoRA adapts: Linear layers by leaf name, fused expert weights as parameters, never routers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from config.job import Hyperparameters
from errors import InputError, ModelError
from training.expert_lora import PEFT_VERSION, unsupported_reason
from training.skeleton import Skeleton, skeleton_of_module

logger = logging.getLogger(__name__)


# Never adapted by "auto": output head, embeddings, and mixture-of-experts routers, whose adapters
# would change which experts run rather than what they compute.
EXCLUDED_MODULES = frozenset({"lm_head", "embed_tokens", "gate", "shared_expert_gate", "router",
                              "score", "classifier"})


@dataclass(frozen=True)
class Targets:
    """Linear layers LoRA wraps (by leaf name) and fused expert weights it wraps as parameters."""

    modules: list[str]
    parameters: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [*self.modules, *self.parameters]


def _generic_name(module_path: str) -> str:
    """'model.layers.7.mlp.experts' → 'mlp.experts': the same name in every layer."""
    import re

    return re.sub(r"^.*?\.\d+\.", "", module_path)


def as_skeleton(model) -> Skeleton:
    """A built model's skeleton, or the skeleton itself (training/skeleton.py: one rule serves both)."""
    return model if isinstance(model, Skeleton) else skeleton_of_module(model)


def fused_expert_parameters(model) -> list[str]:
    """The 3-D routed-expert weights (transformers 5 fuses each layer's experts into one parameter).

    Returned as 'mlp.experts.gate_up_proj'-style names for peft's ``target_parameters``. Convolutions
    (linear attention's short conv is 3-D too) and anything outside an experts module are ignored.
    """
    return sorted({f"{_generic_name(m.name)}.{p}" for m in as_skeleton(model).experts() for p, _ in m.parameters})


def _linear_paths(skeleton: Skeleton) -> dict[str, set[str]]:
    """leaf name → the generic paths of the Linear layers of that name ('mlp.shared_expert.gate_proj')."""
    out: dict[str, set[str]] = {}
    for m in skeleton.linears():
        out.setdefault(m.name.rsplit(".", 1)[-1], set()).add(_generic_name(m.name))
    return out


# peft 0.21.2's _MOE_TARGET_MODULE_MAPPING keys (utils/transformers_weight_conversion.py), copied so that
# planning needs no peft import (it pulls in bitsandbytes: seconds); tests/test_moe_quant.py compares them.
PEFT_MOE_REMAPPED = {
    "mixtral": frozenset({"gate", "w1", "w2", "w3"}),
    "qwen2_moe": frozenset({"gate", "gate_proj", "up_proj", "down_proj"}),
}


def peft_remapped_names(model) -> frozenset[str]:
    """Leaf names peft 0.21 rewrites onto the fused routed experts of this model ('gate_proj', …).

    peft's transformers-v5 MoE conversion maps any target ending in one of them to the experts'
    ``target_parameters``, for every model transformers converts like qwen2_moe (Qwen3-MoE,
    Qwen3-Next) or mixtral: a shared expert's ``gate_proj`` would silently become expert LoRA.
    """
    return PEFT_MOE_REMAPPED.get(as_skeleton(model).conversion_pattern, frozenset())


def _qualified(leaf: str, paths: dict[str, set[str]], remapped: frozenset[str]) -> list[str]:
    """A leaf name as peft must see it: by its paths ('mlp.shared_expert.gate_proj') where peft remaps the leaf."""
    return sorted(paths[leaf]) if leaf in remapped else [leaf]


def expert_lora_on_4bit_refusal(names: list[str]) -> InputError | None:
    """The refusal of LoRA on 4-bit routed experts where the installed peft cannot do it, else None.

    training/expert_lora.py makes it work with the peft version its fixes were written for.
    """
    reason = unsupported_reason()
    if reason is None:
        return None
    return InputError(
        f"hyperparameters.target_modules asks for LoRA on the routed experts ({', '.join(names)}), which "
        f"quantization '4bit' holds in 4-bit: {reason}, and without those fixes peft cannot adapt a 4-bit "
        "expert tensor (it matches it only by its full path, then leaves its LoRA hook stacked on the "
        "4-bit weight so the second step fails, and ignores one of the two expert tensors). Drop the "
        "expert names from target_modules (attention, linear attention and the shared expert stay "
        f"adapted; 'auto' does that under 4-bit), install peft {PEFT_VERSION}, or use quantization "
        "'none' on GPUs that hold the experts in 16 bits"
    )


def resolve_targets(model, requested: str | list[str], *, quantized_experts: bool = False) -> Targets:
    """What LoRA adapts: linear projections, plus fused expert weights for mixture-of-experts models.

    ``auto``: every linear layer but heads, embeddings and routers, and the fused routed experts
    (not when ``quantized_experts``: LoRA on 4-bit experts is asked for by name, never implied).
    ``all-linear``: the linear layers only. A list: each name is a linear layer's leaf name or path
    ('mlp.shared_expert.down_proj') or a fused expert parameter ('gate_up_proj', 'experts.down_proj' or 'mlp.experts.down_proj').
    Where peft would remap a leaf name onto the experts ('gate_proj' on Qwen3-Next's shared expert),
    the Linear layers are named by their paths instead, and ``peft_setup`` keeps peft from rewriting them.
    """
    skeleton = as_skeleton(model)
    paths = _linear_paths(skeleton)
    linear = set(paths)
    remapped = peft_remapped_names(skeleton)
    fused = fused_expert_parameters(skeleton)
    if requested in ("auto", "all-linear"):
        modules = [q for leaf in sorted(linear - EXCLUDED_MODULES) for q in _qualified(leaf, paths, remapped)]
        parameters = fused if requested == "auto" and not quantized_experts else []
        if requested == "auto" and fused and quantized_experts:
            logger.info("target_modules auto: no LoRA on the routed experts, which are 4-bit")
        if not modules and not parameters:
            raise ModelError("the model has no linear projection layers for LoRA to adapt")
        return Targets(modules, parameters)
    all_paths = sorted(p for ps in paths.values() for p in ps)
    modules, parameters, missing = [], [], []
    for name in requested:
        matches = [p for p in fused if p == name or p.endswith("." + name)]
        if name in linear:
            modules.extend(q for q in _qualified(name, paths, remapped) if q not in modules)
        elif "." in name and any(p == name or p.endswith("." + name) for p in all_paths):
            modules.append(name)
        elif matches:
            parameters.extend(m for m in matches if m not in parameters)
        else:
            missing.append(name)
    if missing:
        fused_text = f"; fused expert weights: {', '.join(fused)}" if fused else ""
        raise InputError(
            f"hyperparameters.target_modules {missing} match no linear layer or expert weight of this "
            f"model; it has linear layers: {', '.join(sorted(linear))}{fused_text}"
        )
    refusal = expert_lora_on_4bit_refusal(parameters) if parameters and quantized_experts else None
    if refusal is not None:
        raise refusal
    return Targets(modules, parameters)


def lora_dropout_for(hp: Hyperparameters, targets: Targets) -> float:
    """peft cannot apply dropout inside a fused expert weight (its ParamWrapper refuses any).

    The default dropout gives way to 0 there, and says so; a dropout the user asked for is an error.
    """
    if not targets.parameters or hp.lora_dropout == 0:
        return hp.lora_dropout
    if "lora_dropout" in hp.model_fields_set:
        raise InputError(
            f"hyperparameters.lora_dropout must be 0 when fused expert weights "
            f"({', '.join(targets.parameters)}) are adapted: peft's LoRA on parameters has no dropout; "
            f"got {hp.lora_dropout}. Set lora_dropout to 0, or list target_modules without the experts"
        )
    logger.info("lora_dropout 0 instead of the default %g: fused expert weights are adapted",
                hp.lora_dropout)
    return 0.0
