"""The model wrapped for LoRA: a new adapter from the hyperparameters, or one continued from init_adapter.

Imported only to train (peft and transformers at module level).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed

from errors import TrainingError
from training import expert_lora
from training.moe_quant import quantized_expert_parameters
from training.request import TrainRequest
from training.targets import (
    EXCLUDED_MODULES,
    Targets,
    expert_lora_on_4bit_refusal,
    lora_dropout_for,
    resolve_targets,
)

logger = logging.getLogger(__name__)


def apply_lora(model, request: TrainRequest, batching: str):
    """(the PeftModel, the Targets peft really adapted); logs what is trained and how."""
    quantized = bool(quantized_expert_parameters(model))
    if request.init_adapter is not None:
        saved = LoraConfig.from_pretrained(str(request.init_adapter))
        refusal = expert_lora_on_4bit_refusal(list(saved.target_parameters)) if (
            quantized and saved.target_parameters) else None
        if refusal is not None:
            raise refusal
        with targets_as_written():
            if quantized and saved.target_parameters:  # stock loading would nest the 4-bit wrappers wrongly
                model = expert_lora.load_onto_quantized(model, str(request.init_adapter), is_trainable=True)
            else:
                model = PeftModel.from_pretrained(model, str(request.init_adapter), is_trainable=True)
        targets = _continued_targets(model.peft_config["default"])
    else:
        config, targets = _new_lora(model, request, quantized)
        with targets_as_written():
            model = get_peft_model(model, config)
        if quantized and targets.parameters:
            expert_lora.renest(model)  # the plain base's order: the adapter loads onto the 16-bit base
    verify_adapted(model, targets)
    trainable, total = model.get_nb_trainable_parameters()
    active = model.peft_config["default"]
    runtime = request.runtime
    logger.info("LoRA r=%d alpha=%g on %s%s: %d trainable of %d parameters (%.3f%%), %s %s, %s batches",
                active.r, active.lora_alpha, ",".join(targets.names),
                f" (continued from {request.init_adapter})" if request.init_adapter is not None else "",
                trainable, total, 100 * trainable / total, runtime.device, runtime.precision, batching)
    return model, targets


def _new_lora(model, request: TrainRequest, quantized: bool) -> tuple[LoraConfig, Targets]:
    hp = request.hyperparameters
    targets = resolve_targets(model, hp.target_modules, quantized_experts=quantized)
    parameters = targets.parameters
    if quantized and parameters:
        # peft matches a 4-bit (parametrized) tensor only by its full path, and needs its fixes
        expert_lora.install()
        parameters = expert_lora.full_names(model, parameters)
    dropout = lora_dropout_for(hp, targets)
    set_seed(hp.seed)  # the LoRA init draws from the RNG: same seed, same starting adapter
    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=dropout,
        use_rslora=hp.use_rslora,
        target_modules=targets.modules,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    ), targets


def _continued_targets(saved: LoraConfig) -> Targets:
    modules = saved.target_modules
    # a str is PEFT's regex form: keep it one entry
    modules = [modules] if isinstance(modules, str) else sorted(modules or [])
    return Targets(modules, sorted(saved.target_parameters or []))


@contextlib.contextmanager
def targets_as_written() -> Iterator[None]:
    """Within the block, peft adapts the Linear layers named by a path ('mlp.shared_expert.gate_proj').

    peft 0.21's transformers-v5 MoE conversion (run by ``get_peft_model`` and by every
    ``PeftModel.from_pretrained``) rewrites any target ending in gate_proj/up_proj/down_proj into
    LoRA on the fused routed experts, on Qwen3-MoE and Qwen3-Next: the shared expert would get no
    adapter and the experts an unasked one. Entries with a '.' are module paths, meant as written:
    they are hidden from the conversion and restored after it. Load this worker's adapters inside it.
    """
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion._convert_peft_config_moe

    def convert(peft_config, model):
        written = peft_config.target_modules
        if not written or isinstance(written, str):
            return original(peft_config, model)
        paths = {t for t in written if "." in t}
        peft_config.target_modules = set(written) - paths
        try:
            return original(peft_config, model)
        finally:
            peft_config.target_modules = set(peft_config.target_modules or ()) | paths

    conversion._convert_peft_config_moe = convert
    try:
        yield
    finally:
        conversion._convert_peft_config_moe = original


def adapted(peft_model, adapter: str = "default") -> tuple[list[str], list[str]]:
    """(modules, parameters) that really carry ``adapter``, by their names in the base model."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    modules, parameters = [], []
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        clean = name.replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            parameters.append(f"{clean}.{module.parameter_name}")
        else:
            modules.append(clean)
    return sorted(modules), sorted(parameters)


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def verify_adapted(peft_model, targets: Targets, adapter: str = "default") -> None:
    """Every target adapted, nothing else, no router, every adapter trainable; else fail before training.

    peft only warns when a target matches nothing, and rewrites some names on mixture-of-experts
    models: what it really wrapped is read back from the model, not from its config.
    """
    modules, parameters = adapted(peft_model, adapter)
    problems = []
    missed = [t for t in targets.modules if not any(_matches(m, t) for m in modules)]
    missed += [t for t in targets.parameters if not any(_matches(p, t) for p in parameters)]
    if missed:
        problems.append(f"targets peft did not adapt: {', '.join(missed)}")
    extra = sorted({m for m in modules if not any(_matches(m, t) for t in targets.modules)}
                   | {p for p in parameters if not any(_matches(p, t) for t in targets.parameters)})
    if extra:
        problems.append(f"adapted without being asked: {', '.join(extra[:8])}")
    routers = [n for n in modules + parameters
               if {part for part in n.split(".")} & (EXCLUDED_MODULES - {"lm_head", "embed_tokens"})]
    if routers:
        problems.append(f"routers adapted: {', '.join(routers[:8])}")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = sorted({n.rsplit(f".{adapter}.", 1)[0] for n, _ in peft_model.named_parameters()
                     if ".lora_" in n and f".{adapter}." in n and n not in trainable})
    if frozen and getattr(peft_model.peft_config[adapter], "inference_mode", False) is False:
        problems.append(f"LoRA tensors not trainable: {', '.join(frozen[:8])}")
    if problems:
        raise TrainingError(
            "LoRA was not applied as resolved (" + "; ".join(problems) + "). Nothing was trained; list "
            "hyperparameters.target_modules by the names in this message, or use 'auto'")
    logger.info("LoRA verified on %d modules and %d expert tensors", len(modules), len(parameters))
