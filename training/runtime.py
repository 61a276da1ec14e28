"""Where and how training runs (device, precision, quantization), decided once before any load."""

from __future__ import annotations

from dataclasses import dataclass

from config.job import Hyperparameters
from errors import InputError


@dataclass(frozen=True)
class Runtime:
    """Where and how training runs: decided once, before any weight is loaded."""

    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    quantization: str  # none | 8bit | 4bit
    gradient_checkpointing: bool


def plan_runtime(hp: Hyperparameters, memory_plan=None) -> Runtime:
    """Check the request against this machine; raise InputError before any load if it cannot run.

    ``quantization: auto`` takes the memory plan's choice (none when the model fits in 16 bits, else
    4-bit), and is always none on a CPU.
    """
    import torch

    cuda = torch.cuda.is_available()
    if hp.quantization in ("4bit", "8bit") and not cuda:
        raise InputError(
            f"hyperparameters.quantization '{hp.quantization}' needs a CUDA GPU (bitsandbytes); this "
            "worker has none. Use 'auto' or 'none'"
        )
    if hp.quantization != "auto":
        quantization = hp.quantization
    elif memory_plan is not None and cuda:
        quantization = memory_plan.quantization
    else:
        quantization = "none"
    if cuda:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "fp32"
    checkpointing = cuda if hp.gradient_checkpointing == "auto" else bool(hp.gradient_checkpointing)
    return Runtime("cuda" if cuda else "cpu", precision, quantization, checkpointing)
