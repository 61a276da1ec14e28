"""LoRA on 4-bit routed experts: the fixes peft 0.21.2 needs, applied only to that exact version.

peft adapts a fused 3-D expert tensor with a ``ParamWrapper``, which adds the LoRA delta through a
torch parametrization for the length of each forward. On an expert tensor training/moe_quant.py
already parametrized to NF4 (bitsandbytes' ``Bnb4BitParametrization``), peft 0.21.2 goes wrong in
four ways (read in peft/tuners/tuners_utils.py ``_inject_parameters`` and peft/tuners/lora/layer.py
``ParamWrapper``; docs/moe-expert-quantization-research.md §2):

1. a parametrized tensor is matched only by its full path: callers pass
   ``model.layers.0.mlp.experts.gate_up_proj``, never ``mlp.experts.gate_up_proj`` (``full_names``);
2. ``_remove_parametrizations`` removes only ``_LoraParameterProxy`` from a stack of several, but a
   single adapter registers a ``_LoraFactorsProxy``: it stays on the NF4 weight and the next forward
   fails (``requires_grad_`` on the uint8 storage) — fixed by removing either proxy;
3. the inner of two nested wrappers registers its proxy inside the outer one's
   ``parametrize.cached()``, where torch's safety check reads the weight and caches it without
   LoRA: that tensor's LoRA does nothing and gets no gradient — fixed by dropping that cache entry;
   ``get_param`` also returns a shape-only stand-in for an NF4 tensor (peft reads only shape, dtype
   and device) instead of dequantizing it;
4. the two wrappers of one experts module nest in the opposite order from a plain base, so the saved
   keys would not load onto the 16-bit base — ``renest`` puts them in the plain order.

The fixes are patches on ``ParamWrapper`` applied once (``install``): each leaves a tensor with no
other parametrization exactly as peft handles it. Any other peft version keeps the refusal. Merging
is never done on 4-bit experts (``ParamWrapper.merge`` adds to a dequantized temporary: the expert
LoRA would be silently lost); ``cli.py merge`` loads the unquantized base.
"""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata

logger = logging.getLogger(__name__)

PEFT_VERSION = "0.21.2"  # the patches below were written against this source, line by line
# What peft builds on an unquantized base (parameters wrapped in registration order: gate_up_proj,
# then down_proj, so gate_up_proj is innermost); adapters are saved in this order.
PLAIN_INNER_TO_OUTER = ("gate_up_proj", "down_proj")


def unsupported_reason() -> str | None:
    """Why LoRA on 4-bit experts cannot run with the installed peft, or None when it can.

    Read from the package metadata, not by importing peft (planning imports no peft: seconds).
    """
    try:
        version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        return "peft is not installed"
    if version != PEFT_VERSION:
        return (f"the worker's fixes for LoRA on 4-bit experts are written for peft {PEFT_VERSION} and "
                f"peft {version} is installed")
    return None


def full_names(model, generic: list[str]) -> list[str]:
    """The 4-bit expert tensors' full paths for generic names ('mlp.experts.down_proj'), sorted."""
    from training.moe_quant import quantized_expert_parameters

    return sorted(p for p in quantized_expert_parameters(model)
                  if any(p == g or p.endswith("." + g) for g in generic))


def install() -> None:
    """Patch peft's ParamWrapper (fixes 2 and 3) once; refuses any peft but the one they were written for."""
    import torch
    import torch.nn.utils.parametrize as parametrize
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization
    from peft.tuners.lora import layer

    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)
    wrapper = layer.ParamWrapper
    if getattr(wrapper, "_worker_expert_lora", False):
        return
    proxies = (layer._LoraParameterProxy, layer._LoraFactorsProxy)
    original_activate = wrapper._activate_lora

    def _remove_parametrizations(self):
        base_layer = self.get_base_layer()
        stack = base_layer.parametrizations[self.parameter_name]
        if len(stack) == 1 and isinstance(stack[0], proxies):
            parametrize.remove_parametrizations(base_layer, self.parameter_name, leave_parametrized=False)
            return
        for i in reversed(range(len(stack))):
            if isinstance(stack[i], proxies):
                del stack[i]
                return
        raise RuntimeError(f"no LoRA parametrization on {self.parameter_name!r} to remove")

    def get_param(self):
        base_layer = self.get_base_layer()
        name = self.parameter_name
        if parametrize.is_parametrized(base_layer, name):
            stack = base_layer.parametrizations[name]
            if len(stack) == 1 and isinstance(stack[0], Bnb4bitParametrization):
                state = stack[0].quant_state
                return torch.empty((), dtype=state.dtype, device=stack.original.device).expand(state.shape)
            return stack()  # evaluated outside parametrize's cache, which must not hold a LoRA-less value
        return getattr(base_layer, name)

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        with original_activate(self, active_adapters):
            # registering on an already parametrized tensor read it inside the outer wrapper's
            # parametrize.cached(): that value has no LoRA in it, so the forward must not reuse it
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    wrapper._remove_parametrizations = _remove_parametrizations
    wrapper.get_param = get_param
    wrapper._activate_lora = _activate_lora
    wrapper._worker_expert_lora = True
    logger.info("peft %s ParamWrapper patched for LoRA on 4-bit experts", PEFT_VERSION)


def renest(peft_model, order: tuple[str, ...] = PLAIN_INNER_TO_OUTER) -> int:
    """Re-chain each experts module's nested ParamWrappers into the plain base's order (fix 4).

    Each wrapper adapts only its own tensor, so the order changes the saved names, never the maths.
    Returns the number of modules re-chained.
    """
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import _get_submodules

    root = peft_model.base_model.model
    outermost = [n for n, m in root.named_modules()
                 if isinstance(m, ParamWrapper) and not n.endswith(".base_layer")]
    changed = 0
    for name in outermost:
        parent, outer, attr = _get_submodules(root, name)
        chain, module = [], outer
        while isinstance(module, ParamWrapper):
            chain.append(module)
            module = module.base_layer
        by_name = {w.parameter_name: w for w in chain}
        wanted = [by_name[p] for p in order if p in by_name] + [
            w for w in reversed(chain) if w.parameter_name not in order]
        if wanted == list(reversed(chain)):
            continue
        inner = module
        for w in wanted:  # innermost first
            w.base_layer = inner
            inner = w
        setattr(parent, attr, inner)
        changed += 1
    return changed


def load_onto_quantized(model, adapter_dir: str, *, is_trainable: bool):
    """A saved adapter with expert LoRA onto a base with 4-bit experts: inject, re-nest, load every tensor.

    Stock ``PeftModel.from_pretrained`` would nest the wrappers in the 4-bit order and refuse the
    saved keys; here any saved LoRA tensor without a place, or a LoRA layer left unloaded, is an error.
    """
    from pathlib import Path

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    install()
    config = LoraConfig.from_pretrained(adapter_dir)
    config.inference_mode = not is_trainable
    config.target_parameters = full_names(model, list(config.target_parameters or []))
    peft_model = get_peft_model(model, config)  # the caller shields shared-expert paths from peft's remap
    renest(peft_model)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(Path(adapter_dir))))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"the adapter in {adapter_dir} does not fit this model: saved tensors without a "
                         f"place {result.unexpected_keys[:4]}, LoRA tensors not in it {missing[:4]}")
    return peft_model
