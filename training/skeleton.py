"""A model's skeleton: its parameters' shapes, its Linear layers and its routed-expert modules, no weights.

Two builders give the same skeleton: ``skeleton_of_module`` walks a built model (on the meta device,
or loaded), and ``skeleton_from_config`` derives it from ``config.json`` alone, without torch or
transformers, for the families this worker serves (llama, mistral, qwen2, qwen3, qwen3_moe,
qwen3_next; module names and shapes as transformers 5.24's modeling files build them). Importing
torch and a modeling file costs about 5 s, which is the whole budget of ``cli.py plan``; the memory
plan and the LoRA target rules (training/targets.py) read skeletons only.
tests/test_memory_plan_analytic.py checks that both builders agree, field by field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINEAR = "linear"
EXPERTS = "experts"
_LAYER = re.compile(r".*layers\.\d+")


@dataclass(frozen=True)
class Module:
    """A Linear layer (``in_features``/``out_features``) or a routed-experts module (its 3-D parameters)."""

    name: str  # full path: 'model.layers.0.mlp.experts'
    kind: str  # LINEAR | EXPERTS
    in_features: int = 0
    out_features: int = 0
    parameters: tuple[tuple[str, tuple[int, ...]], ...] = ()  # EXPERTS: own 3-D parameters, name → shape


@dataclass(frozen=True)
class Skeleton:
    model_type: str
    # transformers' conversion pattern ('qwen2_moe', 'mixtral' or None): peft 0.21 remaps some leaf
    # names onto the fused experts for these (training/targets.py)
    conversion_pattern: str | None
    modules: tuple[Module, ...]
    parameters: tuple[tuple[str, tuple[int, ...]], ...]  # every parameter once (a tied head is not repeated)
    layers: tuple[str, ...]  # decoder layer paths: 'model.layers.0', …
    hidden_size: int
    vocab_size: int
    experts_per_token: int  # 1 for a dense model

    def linears(self) -> list[Module]:
        return [m for m in self.modules if m.kind == LINEAR]

    def experts(self) -> list[Module]:
        return [m for m in self.modules if m.kind == EXPERTS]


# --------------------------------------------------------------------------------------------------
# from a built model


def skeleton_of_module(model) -> Skeleton:
    """The skeleton of a built model (any family); torch and the model's classes are already imported."""
    import torch.nn as nn

    modules = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            modules.append(Module(name, LINEAR, module.in_features, module.out_features))
        elif _is_experts(name, module, nn):
            own = tuple((p, tuple(param.shape)) for p, param in module.named_parameters(recurse=False)
                        if param.ndim == 3) + _parametrized_3d(module)
            if own:
                modules.append(Module(name, EXPERTS, parameters=own))
    config = model.config.get_text_config()
    return Skeleton(
        model_type=getattr(config, "model_type", None) or "",
        conversion_pattern=_conversion_pattern_of(model.config),
        modules=tuple(modules),
        parameters=tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
        layers=tuple(n for n, _ in model.named_modules() if _LAYER.fullmatch(n)),
        # LoRA targets need none of these three, only the plan: a config without them still resolves
        hidden_size=getattr(config, "hidden_size", 0) or 0,
        vocab_size=getattr(config, "vocab_size", 0) or 0,
        experts_per_token=getattr(config, "num_experts_per_tok", 1) or 1,
    )


def _parametrized_3d(module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """3-D tensors held as parametrizations (routed experts in 4-bit, training/moe_quant.py), by the
    shape they stand for; a 4-bit one is read from its quantization state, never dequantized."""
    out = []
    for name, stack in getattr(module, "parametrizations", {}).items():
        state = getattr(stack[0], "quant_state", None)
        shape = tuple(state.shape) if state is not None else tuple(getattr(module, name).shape)
        if len(shape) == 3:
            out.append((name, shape))
    return tuple(out)


def _is_experts(name: str, module, nn) -> bool:
    """transformers 5 fuses a layer's routed experts into one module holding 3-D weights; convolutions
    (linear attention's short conv is 3-D too) are not experts."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    return "expert" in type(module).__name__.lower() or name.rsplit(".", 1)[-1] == "experts"


def _conversion_pattern_of(config) -> str | None:
    # already imported with the model's classes: no import cost here
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

    return _MODEL_TO_CONVERSION_PATTERN.get(getattr(config, "model_type", None))


# --------------------------------------------------------------------------------------------------
# from config.json alone

# transformers 5.24's conversion_mapping._MODEL_TO_CONVERSION_PATTERN for the families below (a test
# compares them with transformers').
CONVERSION_PATTERNS = {"qwen3_moe": "qwen2_moe", "qwen3_next": "qwen2_moe"}

# Each family's config defaults (transformers 5.24's configuration_*.py) for the fields that set shapes:
# a config.json may leave any of them out.
_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, attention_bias=False),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=None, attention_bias=False,
                      decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8,
                      num_experts=128, mlp_only_layers=None),
    "qwen3_next": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=256, attention_bias=False,
                       linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                       linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
                       moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10,
                       num_experts=512, mlp_only_layers=None, layer_types=None, full_attention_interval=4),
}
ANALYTIC_FAMILIES = tuple(_DEFAULTS)


class _Builder:
    def __init__(self):
        self.modules: list[Module] = []
        self.parameters: list[tuple[str, tuple[int, ...]]] = []

    def param(self, name: str, *shape: int) -> None:
        self.parameters.append((name, tuple(shape)))

    def linear(self, name: str, n_in: int, n_out: int, bias: bool = False) -> None:
        self.modules.append(Module(name, LINEAR, n_in, n_out))
        self.param(f"{name}.weight", n_out, n_in)
        if bias:
            self.param(f"{name}.bias", n_out)

    def experts(self, name: str, experts: int, hidden: int, width: int) -> None:
        shapes = (("gate_up_proj", (experts, 2 * width, hidden)), ("down_proj", (experts, hidden, width)))
        self.modules.append(Module(name, EXPERTS, parameters=shapes))
        for pname, shape in shapes:
            self.param(f"{name}.{pname}", *shape)

    def mlp(self, name: str, hidden: int, width: int, bias: bool = False) -> None:
        self.linear(f"{name}.gate_proj", hidden, width, bias)
        self.linear(f"{name}.up_proj", hidden, width, bias)
        self.linear(f"{name}.down_proj", width, hidden, bias)


def skeleton_from_config(config: dict) -> Skeleton | None:
    """The skeleton of the model ``config.json`` describes, or None for a family not derived here."""
    model_type = config.get("model_type")
    if model_type not in _DEFAULTS or config.get("text_config") is not None:
        return None
    c = {**_DEFAULTS[model_type], **{k: v for k, v in config.items() if k in _DEFAULTS[model_type]}}
    if model_type == "qwen3_moe" and "num_local_experts" in config:  # attribute_map: num_experts
        c["num_experts"] = config["num_local_experts"]
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c["num_key_value_heads"] or heads
    head_dim = c["head_dim"] or hidden // heads
    b = _Builder()
    b.param("model.embed_tokens.weight", c["vocab_size"], hidden)
    layers = []
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        layers.append(layer)
        if model_type == "qwen3_next" and _qwen3_next_layer_types(c)[i] == "linear_attention":
            _gated_delta_net(b, f"{layer}.linear_attn", c)
        else:
            _attention(b, f"{layer}.self_attn", model_type, c, hidden, heads, kv_heads, head_dim)
        _feed_forward(b, f"{layer}.mlp", model_type, c, i)
        b.param(f"{layer}.input_layernorm.weight", hidden)
        b.param(f"{layer}.post_attention_layernorm.weight", hidden)
    b.param("model.norm.weight", hidden)
    b.modules.append(Module("lm_head", LINEAR, hidden, c["vocab_size"]))
    if not config.get("tie_word_embeddings", False):  # tied: the head is the embedding, listed once
        b.param("lm_head.weight", c["vocab_size"], hidden)
    moe = model_type in ("qwen3_moe", "qwen3_next")
    return Skeleton(model_type, CONVERSION_PATTERNS.get(model_type), tuple(b.modules), tuple(b.parameters),
                    tuple(layers), hidden, c["vocab_size"], (c["num_experts_per_tok"] or 1) if moe else 1)


def _qwen3_next_layer_types(c: dict) -> list[str]:
    if c["layer_types"] is not None:
        return list(c["layer_types"])
    interval = c["full_attention_interval"]
    return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(c["num_hidden_layers"])]


def _attention(b: _Builder, name: str, model_type: str, c: dict, hidden: int, heads: int, kv_heads: int,
               head_dim: int) -> None:
    qkv_bias = {"qwen2": True, "mistral": False}.get(model_type, c.get("attention_bias", False))
    o_bias = False if model_type in ("qwen2", "mistral") else c.get("attention_bias", False)
    q_out = heads * head_dim * (2 if model_type == "qwen3_next" else 1)  # Qwen3-Next: query and its gate
    b.linear(f"{name}.q_proj", hidden, q_out, qkv_bias)
    b.linear(f"{name}.k_proj", hidden, kv_heads * head_dim, qkv_bias)
    b.linear(f"{name}.v_proj", hidden, kv_heads * head_dim, qkv_bias)
    b.linear(f"{name}.o_proj", heads * head_dim, hidden, o_bias)
    if model_type in ("qwen3", "qwen3_moe", "qwen3_next"):
        b.param(f"{name}.q_norm.weight", head_dim)
        b.param(f"{name}.k_norm.weight", head_dim)


def _gated_delta_net(b: _Builder, name: str, c: dict) -> None:
    hidden = c["hidden_size"]
    key_dim = c["linear_key_head_dim"] * c["linear_num_key_heads"]
    value_dim = c["linear_value_head_dim"] * c["linear_num_value_heads"]
    v_heads = c["linear_num_value_heads"]
    b.param(f"{name}.dt_bias", v_heads)
    b.param(f"{name}.A_log", v_heads)
    b.param(f"{name}.conv1d.weight", 2 * key_dim + value_dim, 1, c["linear_conv_kernel_dim"])
    b.linear(f"{name}.in_proj_qkvz", hidden, 2 * key_dim + 2 * value_dim)
    b.linear(f"{name}.in_proj_ba", hidden, 2 * v_heads)
    b.param(f"{name}.norm.weight", c["linear_value_head_dim"])
    b.linear(f"{name}.out_proj", value_dim, hidden)


def _feed_forward(b: _Builder, name: str, model_type: str, c: dict, index: int) -> None:
    hidden = c["hidden_size"]
    sparse = model_type in ("qwen3_moe", "qwen3_next") and index not in (c["mlp_only_layers"] or []) and (
        c["num_experts"] > 0 and (index + 1) % c["decoder_sparse_step"] == 0)
    if not sparse:
        b.mlp(name, hidden, c["intermediate_size"], bias=model_type == "llama" and c["mlp_bias"])
        return
    b.param(f"{name}.gate.weight", c["num_experts"], hidden)  # the router: a parameter, not a Linear
    b.experts(f"{name}.experts", c["num_experts"], hidden, c["moe_intermediate_size"])
    if model_type == "qwen3_next":
        b.mlp(f"{name}.shared_expert", hidden, c["shared_expert_intermediate_size"])
        b.linear(f"{name}.shared_expert_gate", hidden, 1)
