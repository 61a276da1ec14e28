"""Loading the base model for training: precision, quantization and device placement."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from errors import ModelError
from training.kernels import attention_implementation, detect_kernels
from training.moe_quant import expert_quantizing_loader, quantized_expert_parameters, unquantized_expert_parameters
from training.runtime import Runtime

logger = logging.getLogger(__name__)


def quiet_progress_bars() -> None:
    """tqdm bars are carriage-return noise in a worker's log; progress is logged per step instead."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def quantization_config(quantization: str, compute_dtype):
    """bitsandbytes settings: NF4 with double quantization (QLoRA), or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(model_path: Path, runtime: Runtime, trust_remote_code: bool = False, local_rank: int = 0,
                    world_size: int = 1):
    """The base model in the runtime's precision (and quantization), ready for LoRA.

    ``local_rank``: this process's GPU on its machine when several train together (from the request);
    ``world_size``: how many processes train together.

    On a GPU the model loads straight onto its device (no 16-bit copy of the whole model in host
    memory, no second copy across the bus) with flash attention where flash-attn is usable. A job
    whose ranks share the model (FSDP) loads on the host and lets FSDP place the shards.
    """
    import torch

    quiet_progress_bars()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.precision]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if runtime.quantization != "none":
        kwargs["quantization_config"] = quantization_config(runtime.quantization, dtype)
    if runtime.quantization != "none" or (runtime.device == "cuda" and world_size == 1):
        # bitsandbytes quantizes while placing, and a GPU job reads each tensor straight onto its
        # device: the whole model on this process's device.
        kwargs["device_map"] = {"": local_rank if runtime.device == "cuda" else "cpu"}
    if runtime.device == "cuda":
        kwargs["attn_implementation"] = attention_implementation(detect_kernels(cuda=True))
    try:
        model = _from_pretrained(model_path, runtime, kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the base model from {model_path}: {exc}") from exc
    if runtime.quantization == "4bit":
        require_quantized_experts(model)
    if runtime.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=runtime.gradient_checkpointing
        )
    model.config.use_cache = False  # caches are for generation; they waste memory in training
    return model



def _from_pretrained(model_path: Path, runtime: Runtime, kwargs: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    def load(**overrides):
        # 4-bit: the routed experts are quantized too, as each one loads
        with expert_quantizing_loader() if runtime.quantization == "4bit" else nullcontext():
            return AutoModelForCausalLM.from_pretrained(str(model_path), **{**kwargs, **overrides})

    try:
        return load()
    except ValueError as exc:
        # transformers refuses an attention implementation a model class does not support while it
        # builds the model, before any weight is read: fall back to sdpa rather than fail the job.
        if kwargs.get("attn_implementation") != "flash_attention_2" or "ttention" not in str(exc):
            raise
        logger.warning("flash attention is not supported by this model (%s); using sdpa", exc)
        return load(attn_implementation="sdpa")


def require_quantized_experts(model) -> None:
    """A 4-bit load that left a routed expert in 16 bits would not fit where it was planned: fail naming it."""
    left = unquantized_expert_parameters(model)
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        raise ModelError(
            f"quantization '4bit' left {len(left)} routed-expert tensor(s) in full precision: {shown}. "
            "The loader did not hand them to the 4-bit quantizer (a transformers version other than the "
            "pinned one?); use the pinned transformers, or quantization 'none' on larger GPUs")
    quantized = quantized_expert_parameters(model)
    if quantized:
        logger.info("routed experts in 4-bit: %d fused tensors quantized while loading", len(quantized))
