"""Optional GPU kernels: used when the image has them, never required, always reported.

- ``liger_kernel`` (PyPI, Triton): fused RMSNorm/RoPE/SwiGLU/cross-entropy; TRL turns it on with
  ``SFTConfig(use_liger_kernel=True)``.
- ``flash_linear_attention`` (``fla``, PyPI, Triton) and ``causal_conv1d`` (a CUDA build): transformers
  binds them, when importable, in place of its torch reference code for the linear-attention layers
  (Qwen3-Next's Gated DeltaNet), once, when the modeling file is imported. ``linear_attention_kernels``
  reads that binding, so the output reports what really ran, and ``keeps_sequence_boundaries`` says
  whether padding-free batches are safe (docs/linear-attention-padding-free.md).
- ``flash_attn`` (a CUDA build, in some base images): ``attn_implementation="flash_attention_2"``.

Each counts only where it can run: a CUDA device and the module importing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
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


# transformers 5.24's modeling file of each linear-attention model, and its functions that
# ``use_kernel_func_from_hub_with_fallback`` binds to a fused kernel when the package imports:
# operation → (function in the modeling file, the distribution of the fused kernel).
_LINEAR_ATTENTION = {
    "qwen3_next": ("transformers.models.qwen3_next.modeling_qwen3_next", {
        "gated_delta_rule": ("torch_chunk_gated_delta_rule", "flash-linear-attention"),
        "causal_conv1d": ("causal_conv1d_fn", "causal-conv1d"),
    }),
}
FUSED, REFERENCE, UNKNOWN = "fused", "torch reference", "unknown"


def bound_implementation(function) -> str:
    """FUSED if transformers bound ``function`` (a modeling file's fallback-wrapped op) to a kernel package,
    REFERENCE if to its own torch code, UNKNOWN if the wrapper is not the one transformers 5.24 makes.

    transformers decides once, at import (integrations/hub_kernels.py ``use_kernel_func_from_hub_with_fallback``):
    the wrapper closes over ``implementation`` and ``is_new_implementation``.
    """
    try:
        bound = inspect.getclosurevars(function).nonlocals
    except TypeError:
        return UNKNOWN
    if "is_new_implementation" not in bound:
        return UNKNOWN
    return FUSED if bound["is_new_implementation"] else REFERENCE


def linear_attention_kernels(model_type: str | None) -> dict[str, tuple[str, str]]:
    """operation → (FUSED | REFERENCE | UNKNOWN, kernel distribution) for a linear-attention model; {} otherwise.

    Imports the modeling file (already imported once the model is built: no cost then).
    """
    if model_type not in _LINEAR_ATTENTION:
        return {}
    module_name, ops = _LINEAR_ATTENTION[model_type]
    module = importlib.import_module(module_name)
    return {op: (bound_implementation(getattr(module, function, None)), dist)
            for op, (function, dist) in ops.items()}


def keeps_sequence_boundaries(model_type: str | None) -> bool:
    """Whether padding-free batches keep examples apart in this model's linear-attention layers.

    Only with every operation fused: transformers 5.24 passes TRL's ``cu_seq_lens_q`` as ``cu_seqlens``
    to the gated delta rule and ``seq_idx`` to the causal conv1d (modeling_qwen3_next.py lines 699-705
    and 743-753), and the fused kernels honour them; its torch reference code cannot, and raises on them.
    """
    kernels = linear_attention_kernels(model_type)
    return bool(kernels) and all(how == FUSED for how, _ in kernels.values())


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


def kernels_in_use(model, available: dict[str, str]) -> dict[str, str]:
    """Of the optional kernels, those this loaded model runs on: flash-attn when its attention is
    flash_attention_2; for a linear-attention model the fused kernels transformers really bound
    (``{dist: version}``) and ``linear_attention``: "fused", "torch reference" or, when they differ,
    each operation's. liger-kernel is not turned on (untested with this worker's PEFT path), so it is
    never reported as used."""
    config = model.config
    used = {}
    if getattr(config, "_attn_implementation", None) == "flash_attention_2" and "flash-attn" in available:
        used["flash-attn"] = available["flash-attn"]
    kernels = linear_attention_kernels(getattr(config, "model_type", None))
    for how, dist in kernels.values():
        if how == FUSED:
            used[dist] = available.get(dist) or _version(dist)
    kinds = {how for how, _ in kernels.values()}
    if len(kinds) == 1:
        used["linear_attention"] = kinds.pop()
    elif kinds:
        used["linear_attention"] = ", ".join(f"{op}: {how}" for op, (how, _) in sorted(kernels.items()))
    return used
