"""Optional GPU kernels: used when the image has them, never required, always reported.

- ``liger_kernel`` (PyPI, Triton): fused RMSNorm/RoPE/SwiGLU/cross-entropy; TRL turns it on with
  ``SFTConfig(use_liger_kernel=True)``.
- ``flash_linear_attention`` (``fla``, PyPI, Triton) and ``causal_conv1d`` (a CUDA build): transformers
  uses them by itself for linear-attention layers (Qwen3-Next's Gated DeltaNet) when importable;
  without them it runs its slower torch reference code.
- ``flash_attn`` (a CUDA build, in some base images): ``attn_implementation="flash_attention_2"``.

Each counts only where it can run: a CUDA device and the module importing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

logger = logging.getLogger(__name__)

# import name → distribution name
OPTIONAL_KERNELS = {
    "liger_kernel": "liger-kernel",
    "fla": "flash-linear-attention",
    "causal_conv1d": "causal-conv1d",
    "flash_attn": "flash-attn",
}


def detect_kernels(cuda: bool | None = None) -> dict[str, str]:
    """``{distribution: version}`` for each optional kernel package usable here (none on a CPU).

    A package that is installed but fails to import (built for another torch or CUDA) is left out:
    transformers would not use it either.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return {}
    found = {}
    for module, dist in OPTIONAL_KERNELS.items():
        try:
            importlib.import_module(module)
            found[dist] = importlib.metadata.version(dist)
        except (ImportError, OSError, RuntimeError) as exc:  # a build for another torch/CUDA: unusable
            logger.info("optional kernel %s not used: %s: %s", dist, type(exc).__name__, exc)
    return found


def attention_implementation(kernels: dict[str, str]) -> str:
    """flash_attention_2 when flash-attn is usable, else PyTorch's sdpa."""
    return "flash_attention_2" if "flash-attn" in kernels else "sdpa"


# Model types whose linear-attention layers transformers runs on fla / causal-conv1d when importable.
_LINEAR_ATTENTION_MODELS = ("qwen3_next",)


def kernels_in_use(model, available: dict[str, str]) -> dict[str, str]:
    """Of the usable kernels, those this loaded model runs on: flash-attn when its attention is
    flash_attention_2, fla and causal-conv1d for linear-attention models. liger-kernel is not turned
    on (untested with this worker's PEFT path), so it is never reported as used."""
    config = model.config
    used = {}
    if getattr(config, "_attn_implementation", None) == "flash_attention_2" and "flash-attn" in available:
        used["flash-attn"] = available["flash-attn"]
    if getattr(config, "model_type", None) in _LINEAR_ATTENTION_MODELS:
        for dist in ("flash-linear-attention", "causal-conv1d"):
            if dist in available:
                used[dist] = available[dist]
    return used

