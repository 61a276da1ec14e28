"""What LoRA adapts: Linear layers by leaf name, fused expert weights as parameters, never routers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from config.job import Hyperparameters
from errors import InputError, ModelError

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


def fused_expert_parameters(model) -> list[str]:
    """The 3-D routed-expert weights (transformers 5 fuses each layer's experts into one parameter).

    Returned as 'mlp.experts.gate_up_proj'-style names for peft's ``target_parameters``. Convolutions
    (linear attention's short conv is 3-D too) and anything outside an experts module are ignored.
    """
    import torch.nn as nn

    found: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "expert" not in type(module).__name__.lower() and leaf != "experts":
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim == 3:
                found.add(f"{_generic_name(name)}.{pname}")
    return sorted(found)


def _linear_leaves(model) -> set[str]:
    import torch.nn as nn

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def resolve_targets(model, requested: str | list[str]) -> Targets:
    """What LoRA adapts: linear projections, plus fused expert weights for mixture-of-experts models.

    ``auto``: every linear layer but heads, embeddings and routers, and the fused routed experts.
    ``all-linear``: the linear layers only. A list: each name is a linear layer's leaf name or a fused
    expert parameter ('gate_up_proj', 'experts.down_proj' or 'mlp.experts.down_proj').
    """
    linear = _linear_leaves(model)
    fused = fused_expert_parameters(model)
    if requested in ("auto", "all-linear"):
        modules = sorted(linear - EXCLUDED_MODULES)
        parameters = fused if requested == "auto" else []
        if not modules and not parameters:
            raise ModelError("the model has no linear projection layers for LoRA to adapt")
        return Targets(modules, parameters)
    modules, parameters, missing = [], [], []
    for name in requested:
        matches = [p for p in fused if p == name or p.endswith("." + name)]
        if name in linear:
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
