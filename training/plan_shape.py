"""What the memory plan needs from a model (``Shape``), from its skeleton (training/skeleton.py).

``model_skeleton`` derives the skeleton from ``config.json`` alone for the families this worker
serves (no torch, no transformers import: ``cli.py plan`` answers in well under a second), and
builds the model on the meta device for any other family. ``measure`` turns a skeleton and a LoRA
request into the figures the plan counts with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from errors import ModelError
from training.moe_quant import EXPERT_PARAMETER_NAMES
from training.skeleton import Skeleton, skeleton_from_config, skeleton_of_module
from training.targets import _generic_name, resolve_targets


@dataclass(frozen=True)
class Shape:
    """What the plan needs from the model, measured once and reused for every alternative."""

    model_type: str
    parameters: tuple[tuple[str, int, int, str], ...]  # name, numel, rows, kind: linear | expert | "" (by name)
    lora_parameters: int  # on Linear layers
    expert_lora_parameters: int  # on the fused routed experts
    expert_targets: tuple[str, ...]  # the routed-expert parameters the request adapts
    explicit_expert_targets: bool  # named in target_modules (not just implied by 'auto')
    expert_layer_elements: tuple[int, ...]  # fused routed-expert elements per MoE layer
    per_token_layer_elements: tuple[int, ...]  # activation elements saved per token, per decoder layer
    hidden_size: int
    vocab_size: int
    stored_bytes: int


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


def model_skeleton(model_dir: str | Path, trust_remote_code: bool = False) -> Skeleton:
    """From config.json alone where the family is known (and its own code is not asked for), else the meta model."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the model's config {path} to plan memory: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"the model's config {path} is not a JSON object")
    remote = trust_remote_code and "auto_map" in config  # the repo's own classes may differ from transformers'
    skeleton = None if remote else skeleton_from_config(config)
    return skeleton if skeleton is not None else skeleton_of_module(meta_model(Path(model_dir), trust_remote_code))


def measure(skeleton: Skeleton, lora_r: int, target_modules, stored_bytes: int) -> Shape:
    linear_weights = {f"{m.name}.weight" for m in skeleton.linears()}
    expert_weights = {f"{m.name}.{p}" for m in skeleton.experts() for p in EXPERT_PARAMETER_NAMES}
    params = []
    expert_layers: dict[str, int] = {}
    for name, shape in skeleton.parameters:
        numel = _numel(shape)
        kind = "linear" if name in linear_weights and not name.startswith("lm_head") else ""
        if name in expert_weights and len(shape) == 3:
            kind = "expert"
            layer = name.rsplit(".", 2)[0]
            expert_layers[layer] = expert_layers.get(layer, 0) + numel
        params.append((name, numel, shape[0] if shape else 1, kind))

    targets = resolve_targets(skeleton, target_modules)
    lora = sum(lora_r * (m.in_features + m.out_features) for m in skeleton.linears()
               if any(_generic_name(m.name) == t or _generic_name(m.name).endswith("." + t) for t in targets.modules))
    experts_lora = sum(shape[0] * lora_r * (shape[1] + shape[2]) for name, shape in skeleton.parameters
                       if len(shape) == 3 and any(name.endswith(p) for p in targets.parameters))

    per_layer = []
    for layer in skeleton.layers:
        prefix = layer + "."
        # Each projection keeps its input for the backward pass and produces an output; routed
        # experts see top_k copies of every token. Plus norms and residuals: 4 × hidden.
        elements = 4 * skeleton.hidden_size
        elements += sum(m.in_features + m.out_features for m in skeleton.linears() if m.name.startswith(prefix))
        elements += sum(skeleton.experts_per_token * (shape[1] + shape[2]) for name, shape in skeleton.parameters
                        if len(shape) == 3 and name.startswith(prefix) and ".experts." in "." + name[len(prefix):])
        per_layer.append(elements)
    return Shape(skeleton.model_type, tuple(sorted(params)), lora, experts_lora, tuple(targets.parameters),
                 bool(targets.parameters) and target_modules not in ("auto", "all-linear"),
                 tuple(expert_layers.values()), tuple(per_layer), skeleton.hidden_size, skeleton.vocab_size,
                 stored_bytes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
