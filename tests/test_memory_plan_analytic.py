"""The plan's model shape from config.json alone equals the one measured on the meta-device model.

``cli.py plan`` and the pipeline's memory plan derive a model's skeleton analytically for the families
the worker serves (training/skeleton.py); this file builds each of them on the meta device too and
compares the plan's ``Shape`` field by field, for several ``target_modules`` choices.
"""

from __future__ import annotations

import pytest
import transformers

from demo.tiny_models import FAMILIES, QWEN3_NEXT_80B, tiny_config
from errors import InputError
from training.plan_shape import measure, meta_model, model_skeleton
from training.skeleton import (
    ANALYTIC_FAMILIES,
    CONVERSION_PATTERNS,
    skeleton_from_config,
    skeleton_of_module,
)
from training.targets import resolve_targets

TARGETS = ["auto", "all-linear", ["q_proj", "v_proj"], ["q_proj", "o_proj", "gate_proj", "down_proj"],
           ["mlp.shared_expert.down_proj", "in_proj_qkvz"], ["q_proj", "gate_up_proj"],
           ["experts.down_proj", "mlp.experts.gate_up_proj"], ["k_proj", "no_such_layer"]]


def _configs():
    yield "qwen3_next_80b", transformers.Qwen3NextConfig(**QWEN3_NEXT_80B)
    for family in FAMILIES:
        yield family, tiny_config(family, 512)
    # the variations the families' modeling files branch on
    yield "llama_tied_biased", transformers.LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=None, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    yield "qwen2_tied", transformers.Qwen2Config(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=True)
    yield "qwen3_moe_mixed", transformers.Qwen3MoeConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
        decoder_sparse_step=2, mlp_only_layers=[3])
    yield "qwen3_next_interval", transformers.Qwen3NextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=3, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[1],
        full_attention_interval=3, attention_bias=True)


CONFIGS = dict(_configs())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, config in CONFIGS.items():
        out[name] = tmp_path_factory.mktemp(name)
        config.save_pretrained(out[name])
    return out


def _measured(skeleton, target_modules):
    try:
        return measure(skeleton, 8, target_modules, 0)
    except InputError as exc:
        return str(exc)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_analytic_shape_equals_the_meta_model_shape(folders, name):
    import json

    config = json.loads((folders[name] / "config.json").read_text())
    analytic = skeleton_from_config(config)
    assert analytic is not None and analytic.model_type in ANALYTIC_FAMILIES
    meta = skeleton_of_module(meta_model(folders[name]))
    assert sorted(analytic.parameters) == sorted(meta.parameters)
    assert sorted(analytic.modules, key=lambda m: m.name) == sorted(meta.modules, key=lambda m: m.name)
    assert (analytic.model_type, analytic.conversion_pattern, analytic.layers, analytic.hidden_size,
            analytic.vocab_size, analytic.experts_per_token) == (
        meta.model_type, meta.conversion_pattern, meta.layers, meta.hidden_size, meta.vocab_size,
        meta.experts_per_token)
    refused = 0
    for target_modules in TARGETS:
        got, want = _measured(analytic, target_modules), _measured(meta, target_modules)
        assert got == want, target_modules  # the Shape, field by field (or the same refusal, word for word)
        refused += isinstance(want, str)
        if not isinstance(want, str):
            assert resolve_targets(analytic, target_modules) == resolve_targets(meta, target_modules)
    assert refused < len(TARGETS)


def test_the_80b_shape_is_the_published_one(folders):
    shape = measure(model_skeleton(folders["qwen3_next_80b"]), 8, "auto", 0)
    assert sum(p[1] for p in shape.parameters) == pytest.approx(79.67e9, rel=1e-3)
    assert shape.expert_layer_elements == (512 * 3 * 512 * 2048,) * 48  # gate_up [E, 2I, H] + down [E, H, I]
    assert shape.expert_lora_parameters == 48 * 512 * 8 * ((2048 + 1024) + (2048 + 512))  # r (in + out) each
    assert shape.expert_targets == ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")


def test_conversion_patterns_are_transformers_own():
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

    assert {f: _MODEL_TO_CONVERSION_PATTERN.get(f) for f in ANALYTIC_FAMILIES} == {
        f: CONVERSION_PATTERNS.get(f) for f in ANALYTIC_FAMILIES}


def test_other_families_are_built_on_the_meta_device(tmp_path):
    config = transformers.MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3)
    config.save_pretrained(tmp_path)
    assert skeleton_from_config(config.to_dict()) is None
    skeleton = model_skeleton(tmp_path)
    assert skeleton.model_type == "mixtral" and len(skeleton.experts()) == 2
    assert measure(skeleton, 8, "auto", 0) == measure(skeleton_of_module(meta_model(tmp_path)), 8, "auto", 0)


def test_a_config_with_its_own_code_is_built_from_that_code(tmp_path, monkeypatch):
    import training.plan_shape as plan_shape

    tiny_config("llama", 300).save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text.replace('"model_type"', '"auto_map": {}, "model_type"'))
    built = []
    monkeypatch.setattr(plan_shape, "meta_model", lambda folder, trust: built.append(trust) or meta_model(folder))
    model_skeleton(tmp_path, trust_remote_code=True)
    assert built == [True]
    model_skeleton(tmp_path, trust_remote_code=False)  # transformers' own class: derived, not built
    assert built == [True]
