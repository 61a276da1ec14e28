"""Where and how training runs (device, precision, quantization), decided once before any load.

The rules live here and nowhere else: the memory plan counts bytes with them and ``plan_runtime``
loads the model with them, so the two cannot disagree.
"""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from config.job import Hyperparameters
from errors import InputError

Device = Literal["cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
Quantization = Literal["none", "8bit", "4bit"]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Runtime:
    """Where and how training runs: decided once, before any weight is loaded.

    A pydantic dataclass: it travels inside ``TrainRequest`` to the ranks of a multi-process job.
    """

    device: Device
    precision: Precision
    quantization: Quantization
    gradient_checkpointing: bool


def choose_precision(cuda: bool, bf16_supported: bool) -> Precision:
    """The one precision rule: bf16 on a GPU that has it, else fp16 (with loss scaling); fp32 on a CPU."""
    if not cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def choose_quantization(requested: str, cuda: bool, planned: str | None) -> Quantization:
    """``auto`` takes the memory plan's choice on a GPU and is always none on a CPU (bitsandbytes needs CUDA)."""
    if requested != "auto":
        return requested  # type: ignore[return-value]  # Hyperparameters allows only the three others
    return planned if cuda and planned is not None else "none"  # type: ignore[return-value]


def choose_checkpointing(requested: str | bool, cuda: bool) -> bool:
    """``auto``: on a GPU, where memory is short; off on a CPU, where recomputing only costs time."""
    return cuda if requested == "auto" else bool(requested)


def this_machine() -> tuple[bool, bool]:
    """(CUDA present, bf16 supported) on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


@functools.lru_cache(maxsize=None)
def bitsandbytes_4bit_runs(device: str) -> str | None:
    """None if bitsandbytes can run a 4-bit layer on ``device`` here, else why not (in words).

    bitsandbytes 0.50 runs 4-bit on a CPU too (slowly); an old or missing install does not.
    """
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.ones(1, 64, device=device))
    except ImportError:
        return "bitsandbytes is not installed"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means: not on this machine
        return f"bitsandbytes cannot run a 4-bit layer on {device} ({type(exc).__name__}: {exc})"
    return None


def check_runnable(hp: Hyperparameters) -> None:
    """Raise InputError if this machine cannot run the request, before any download.

    4-bit runs wherever bitsandbytes runs it (CUDA, or a CPU with bitsandbytes >= 0.49); 8-bit
    needs a CUDA GPU.
    """
    cuda = this_machine()[0]
    if hp.quantization == "8bit" and not cuda:
        raise InputError(
            "hyperparameters.quantization '8bit' needs a CUDA GPU (bitsandbytes); this worker has none. "
            "Use '4bit', 'auto' or 'none'"
        )
    if hp.quantization == "4bit":
        problem = bitsandbytes_4bit_runs("cuda" if cuda else "cpu")
        if problem:
            raise InputError(f"hyperparameters.quantization '4bit' cannot run on this worker: {problem}. "
                             "Use 'auto' or 'none'")


def plan_runtime(hp: Hyperparameters, memory_plan=None) -> Runtime:
    """Check the request against this machine; raise InputError before any load if it cannot run.

    ``quantization: auto`` takes the memory plan's choice (none when the model fits in 16 bits, else
    4-bit), and is always none on a CPU.
    """
    check_runnable(hp)
    cuda, bf16 = this_machine()
    planned = memory_plan.quantization if memory_plan is not None else None
    return Runtime("cuda" if cuda else "cpu", choose_precision(cuda, bf16),
                   choose_quantization(hp.quantization, cuda, planned),
                   choose_checkpointing(hp.gradient_checkpointing, cuda))
