"""The model wrapped for LoRA: a new adapter from the hyperparameters, or one continued from init_adapter.

Imported only to train (peft and transformers at module level).
"""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed

from training.request import TrainRequest
from training.targets import Targets, lora_dropout_for, resolve_targets

logger = logging.getLogger(__name__)


def apply_lora(model, request: TrainRequest, batching: str):
    """(the PeftModel, the Targets peft really adapted); logs what is trained and how."""
    if request.init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(request.init_adapter), is_trainable=True)
        targets = _continued_targets(model.peft_config["default"])
    else:
        model = get_peft_model(model, _new_lora(model, request))
        targets = _applied_targets(model.peft_config["default"])
    trainable, total = model.get_nb_trainable_parameters()
    active = model.peft_config["default"]
    runtime = request.runtime
    logger.info("LoRA r=%d alpha=%g on %s%s: %d trainable of %d parameters (%.3f%%), %s %s, %s batches",
                active.r, active.lora_alpha, ",".join(targets.names),
                f" (continued from {request.init_adapter})" if request.init_adapter is not None else "",
                trainable, total, 100 * trainable / total, runtime.device, runtime.precision, batching)
    return model, targets


def _new_lora(model, request: TrainRequest) -> LoraConfig:
    hp = request.hyperparameters
    targets = resolve_targets(model, hp.target_modules)
    dropout = lora_dropout_for(hp, targets)
    set_seed(hp.seed)  # the LoRA init draws from the RNG: same seed, same starting adapter
    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=dropout,
        use_rslora=hp.use_rslora,
        target_modules=targets.modules,
        target_parameters=targets.parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _continued_targets(saved: LoraConfig) -> Targets:
    modules = saved.target_modules
    # a str is PEFT's regex form: keep it one entry
    modules = [modules] if isinstance(modules, str) else sorted(modules or [])
    return Targets(modules, sorted(saved.target_parameters or []))


def _applied_targets(applied: LoraConfig) -> Targets:
    """What peft really targets, which is not always what was asked.

    peft 0.21 remaps leaf names of a transformers-4 MoE layout ('gate_proj', 'up_proj',
    'down_proj' on qwen2_moe-like models, Qwen3-Next included) onto the fused expert
    parameters, so a shared expert's Linear layers of those names are not adapted. Report
    what peft really targets.
    """
    params = set(applied.target_parameters or [])
    params = {p for p in params if not any(q != p and q.endswith("." + p) for q in params)}
    return Targets(sorted(applied.target_modules or []), sorted(params))
