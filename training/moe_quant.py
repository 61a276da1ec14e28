"""4-bit routed experts: quantized by the loader as each fused expert tensor is built, then checked.

bitsandbytes' ``load_in_4bit`` quantizes ``nn.Linear`` layers only. transformers 5 fuses a
mixture-of-experts layer's routed experts into two 3-D parameters (``mlp.experts.gate_up_proj``
[E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]), which it leaves in 16 bits: 97% of
Qwen3-Next-80B-A3B. ``expert_quantizing_loader()`` swaps transformers' 4-bit quantizer for a subclass
that also claims those tensors: the loader hands each one over as soon as its per-expert pieces are
merged, it becomes an NF4 parametrization at once (``bitsandbytes.nn.parametrize``), and the 16-bit
copy is dropped. Peak memory while loading is the quantized model plus one fused tensor, never the
whole model in 16 bits, and transformers' allocator warm-up and device-map sizing count 4-bit bytes
for the experts too (they would ask for 146 GiB instead of 38 GiB for the 80B otherwise).

Depends on transformers 5.24's loader internals (``ConversionOps.convert`` receives ``model`` and
``missing_keys`` and honours an empty result); requirements.txt pins it and tests/test_moe_quant.py
checks it. The formula for the bytes bitsandbytes stores is ``nf4_bytes``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

EXPERT_PARAMETER_NAMES = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64  # bitsandbytes' 4-bit block (transformers 5.24 exposes no setting)
NESTED_BLOCKSIZE = 256  # double quantization: absmax quantized in blocks of 256


def nf4_bytes(numel: int, *, double_quant: bool = True) -> int:
    """Bytes bitsandbytes 0.50 stores for one 4-bit tensor of ``numel`` elements, quantization state included.

    Packed data ``ceil(n/2)``; the 16-entry fp32 code (64 B); absmax per block of 64: fp32 without
    double quantization, uint8 with it plus its own fp32 absmax per 256 blocks, a 256-entry fp32
    code and an fp32 offset. Equal to the measured storage (tests/test_moe_quant.py).
    """
    blocks = math.ceil(numel / BLOCKSIZE)
    if double_quant:
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 64 + 1024 + 4
    return math.ceil(numel / 2) + 4 * blocks + 64


def is_experts_module(module) -> bool:
    """A fused routed-experts module (``Qwen3NextExperts``, ``Qwen3MoeExperts``, …); shared experts are Linear."""
    return type(module).__name__.endswith("Experts") and any(
        hasattr(module, name) for name in EXPERT_PARAMETER_NAMES)


def is_routed_expert_parameter(module, name: str) -> bool:
    """A fused 3-D routed-expert tensor still in full precision (not yet an NF4 parametrization)."""
    import torch.nn.utils.parametrize as parametrize

    if name not in EXPERT_PARAMETER_NAMES or not type(module).__name__.endswith("Experts"):
        return False
    if parametrize.is_parametrized(module, name):
        return False
    param = module._parameters.get(name)
    return param is not None and param.ndim == 3


def has_fused_experts(model) -> bool:
    return any(is_experts_module(m) for m in model.modules())


def _settings(bnb_config) -> dict:
    return {"quant_type": getattr(bnb_config, "bnb_4bit_quant_type", None) or "nf4",
            "compress_statistics": bool(getattr(bnb_config, "bnb_4bit_use_double_quant", False))}


def quantize_expert_(module, name: str, value=None, **settings) -> None:
    """``module.<name>`` (or ``value``, freshly loaded) as an NF4 parametrization; the 16-bit tensor is dropped.

    It dequantizes to the dtype it had here: load in the compute dtype.
    """
    import torch
    import torch.nn as nn
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    with torch.no_grad():
        if value is not None:  # replace_parameter_4bit quantizes the registered parameter
            module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=False)
        replace_parameter_4bit(module, name, **settings)
    module.parametrizations[name].original._is_hf_initialized = True  # never re-initialised by the loader
    if all(not is_routed_expert_parameter(module, n) for n in EXPERT_PARAMETER_NAMES):
        module._is_hf_initialized = True  # _init_weights would dequantize and overwrite a temporary


def _quantizer_class():
    """transformers' 4-bit quantizer, extended to the fused experts (built lazily: transformers is heavy)."""
    from transformers.core_model_loading import ConversionOps
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizers_utils import (
        get_module_from_name,
        should_convert_module,
    )

    class ExpertAndLinear4bitQuantize(ConversionOps):
        """The loader's quantize step: experts become NF4 parametrizations here, Linear weights go on to bnb."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer
            self.linear = Bnb4bitQuantize(hf_quantizer)

        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            rest = {}
            for key, value in input_dict.items():
                module, name = get_module_from_name(model, key)
                if name not in EXPERT_PARAMETER_NAMES or not type(module).__name__.endswith("Experts"):
                    rest[key] = value
                    continue
                value = value[0] if isinstance(value, list) else value
                quantize_expert_(module, name, value, **_settings(self.hf_quantizer.quantization_config))
                self.hf_quantizer.quantized_experts.append(key)
                if missing_keys is not None:
                    missing_keys.discard(key)  # set here, not returned: the loader would call it missing
            if not rest:
                return {}
            return self.linear.convert(rest, full_layer_name=full_layer_name, model=model,
                                       missing_keys=missing_keys, **kwargs)

    class ExpertBnb4BitHfQuantizer(Bnb4BitHfQuantizer):
        """``load_in_4bit`` that also quantizes fused routed experts as they load."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.quantized_experts: list[str] = []

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            if super().param_needs_quantization(model, param_name, **kwargs):
                return True
            module, name = get_module_from_name(model, param_name)
            return is_routed_expert_parameter(module, name) and should_convert_module(
                param_name.rpartition(".")[0], getattr(self, "modules_to_not_convert", None))

        def get_quantize_ops(self):
            return ExpertAndLinear4bitQuantize(self)

    return ExpertBnb4BitHfQuantizer


@contextlib.contextmanager
def expert_quantizing_loader() -> Iterator[list]:
    """Within the block, ``from_pretrained`` with a 4-bit ``BitsAndBytesConfig`` quantizes the experts too.

    Yields a list that receives the quantizers created (each lists its ``quantized_experts``). The
    model keeps ``quant_method="bitsandbytes"``, which peft and the Trainer look for.
    """
    from transformers.quantizers import auto

    base = _quantizer_class()
    created: list = []

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    key = "bitsandbytes_4bit"
    saved = auto.AUTO_QUANTIZER_MAPPING[key]
    auto.AUTO_QUANTIZER_MAPPING[key] = Recording
    try:
        yield created
    finally:
        auto.AUTO_QUANTIZER_MAPPING[key] = saved


def unquantized_expert_parameters(model) -> list[str]:
    """Fused routed-expert tensors still in full precision: [] after a correct 4-bit load."""
    return [f"{path}.{name}" for path, module in model.named_modules() for name in EXPERT_PARAMETER_NAMES
            if is_routed_expert_parameter(module, name)]


def quantized_expert_parameters(model) -> list[str]:
    """Fused routed-expert tensors held as 4-bit parametrizations."""
    import torch.nn.utils.parametrize as parametrize

    return [f"{path}.{name}" for path, module in model.named_modules() if is_experts_module(module)
            for name in EXPERT_PARAMETER_NAMES if parametrize.is_parametrized(module, name)]


# --------------------------------------------------------------------------------------------------
# what the loaded model really holds


def _quant_state_tensors(quant_state) -> list:
    """The tensors a bitsandbytes QuantState keeps beside the packed weight (nested state included)."""
    out = [t for t in (quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None)) if t is not None]
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        out += [t for t in (nested.absmax, nested.code) if t is not None]
    return out


def _quant_states(model):
    """(owner name, QuantState) of every 4-bit Linear weight and every 4-bit expert parametrization."""
    import torch.nn.utils.parametrize as parametrize

    for path, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and getattr(weight, "quant_state", None) is not None:
            yield f"{path}.weight", weight.quant_state
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if getattr(p, "quant_state", None) is not None:
                        yield f"{path}.{name}", p.quant_state


def measure_model(model, group_of) -> dict:
    """Bytes the loaded model holds, by dtype and by ``group_of(name)``, on the devices it sits on.

    Parameters (4-bit ones as their packed uint8 storage), buffers, and the quantization state
    bitsandbytes keeps outside them (absmax, codes, nested absmax). Each storage counts once.
    """
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    by_group: dict[str, int] = {}
    devices: set[str] = set()

    def add(name: str, tensor) -> None:
        key = id(tensor)
        if key in seen:
            return
        seen.add(key)
        size = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size
        group = group_of(name.replace(".parametrizations.", ".").removesuffix(".original"))
        by_group[group] = by_group.get(group, 0) + size
        devices.add(tensor.device.type)

    for name, tensor in model.named_parameters():
        add(name, tensor)
    for name, tensor in model.named_buffers():
        add(name, tensor)
    for name, state in _quant_states(model):
        for tensor in _quant_state_tensors(state):
            add(name, tensor)
    return {"total_bytes": sum(by_dtype.values()), "bytes_by_dtype": by_dtype, "bytes_by_group": by_group,
            "devices": sorted(devices), "quantized_expert_tensors": len(quantized_expert_parameters(model)),
            "unquantized_expert_tensors": len(unquantized_expert_parameters(model))}
