"""Routed experts quantized while loading (training/moe_quant.py), the check after it, and the check
that peft adapted every resolved target (training/peft_setup.verify_adapted)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from config.job import TrainingJob
from errors import ModelError, TrainingError
from tests.conftest import small_job
from training.loading import load_base_model, require_quantized_experts
from training.memory_plan import measure_loaded
from training.moe_quant import nf4_bytes, quantized_expert_parameters, unquantized_expert_parameters
from training.runtime import Runtime, bitsandbytes_4bit_runs, plan_runtime

needs_4bit = pytest.mark.skipif(bitsandbytes_4bit_runs("cpu") is not None,
                                reason="bitsandbytes cannot run 4-bit on this CPU")
CPU_4BIT = Runtime("cpu", "fp32", "4bit", False)


@needs_4bit
def test_4bit_is_planned_on_a_cpu_where_bitsandbytes_runs():
    hp = TrainingJob.from_payload(small_job(hyperparameters={"quantization": "4bit"})).hyperparameters
    assert plan_runtime(hp).quantization == "4bit"


@needs_4bit
@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_moe"])
def test_the_loader_quantizes_every_routed_expert_as_quantizing_after_load_would(family, model_factory):
    import bitsandbytes as bnb
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    folder = model_factory(family)
    model = load_base_model(folder, CPU_4BIT)
    layers = model.config.num_hidden_layers
    assert unquantized_expert_parameters(model) == []
    assert len(quantized_expert_parameters(model)) == 2 * layers
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # Linear layers as before

    # The same bits as loading in full precision and quantizing each expert afterwards.
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for i in range(layers):
        loaded, reference = model.model.layers[i].mlp.experts, plain.model.layers[i].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            replace_parameter_4bit(reference, name, quant_type="nf4", compress_statistics=True)
            assert torch.equal(loaded.parametrizations[name].original, reference.parametrizations[name].original)
            assert torch.equal(getattr(loaded, name), getattr(reference, name))  # dequantized alike

    # What the model holds is bitsandbytes' storage, quantization state included, to the byte.
    measured = measure_loaded(model)
    expected = sum(nf4_bytes(s.numel()) for s in (
        getattr(plain.model.layers[i].mlp.experts, n) for i in range(layers) for n in ("gate_up_proj", "down_proj")))
    assert measured["bytes_by_group"]["routed_experts"] == expected
    assert measured["unquantized_expert_tensors"] == 0


@needs_4bit
def test_a_4bit_load_that_left_experts_in_full_precision_fails_naming_them(model_factory):
    folder = model_factory("qwen3_moe")
    # transformers' own 4-bit quantizer: Linear layers only, experts left as they were
    stock = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    with pytest.raises(ModelError) as info:
        require_quantized_experts(stock)
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(info.value)
    assert f"{2 * stock.config.num_hidden_layers} routed-expert tensor(s)" in str(info.value)


def _lora(model, targets):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=targets.modules,
                      target_parameters=targets.parameters or None, task_type="CAUSAL_LM")


def test_a_target_peft_silently_skips_fails_before_training_naming_it(model_factory, monkeypatch):
    import contextlib

    from peft import get_peft_model

    from training import peft_setup
    from training.targets import resolve_targets

    folder = model_factory("qwen3_next")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = resolve_targets(model, ["q_proj", "in_proj_qkvz", "gate_proj", "up_proj", "down_proj"])
    assert targets.modules == ["q_proj", "in_proj_qkvz", "mlp.shared_expert.gate_proj",
                               "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
    assert targets.parameters == []

    with peft_setup.targets_as_written():
        wrapped = get_peft_model(model, _lora(model, targets))
    peft_setup.verify_adapted(wrapped, targets)  # as resolved: passes
    modules, parameters = peft_setup.adapted(wrapped)
    assert any(m.endswith("mlp.shared_expert.gate_proj") for m in modules) and parameters == []

    # Without the guard peft rewrites the shared expert's names onto the routed experts, warning only.
    monkeypatch.setattr(peft_setup, "targets_as_written", contextlib.nullcontext)
    fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    unguarded = get_peft_model(fresh, _lora(fresh, targets))
    with pytest.raises(TrainingError) as info:
        peft_setup.verify_adapted(unguarded, targets)
    message = str(info.value)
    assert "targets peft did not adapt: mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj" in message
    assert "adapted without being asked: " in message and "mlp.experts.gate_up_proj" in message


def test_auto_targets_never_routers_and_drop_4bit_experts(model_factory, monkeypatch):
    from training import expert_lora
    from training.targets import resolve_targets

    model = AutoModelForCausalLM.from_pretrained(model_factory("qwen3_next"), dtype=torch.float32)
    full = resolve_targets(model, "auto")
    assert full.parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert not {"gate", "shared_expert_gate"} & set(full.modules)
    assert {"q_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "mlp.shared_expert.up_proj"} <= set(full.modules)
    quantized = resolve_targets(model, "auto", quantized_experts=True)
    assert quantized.modules == full.modules and quantized.parameters == []
    # named, 4-bit experts are adapted (training/expert_lora.py) — with the peft its fixes were written for
    named = resolve_targets(model, ["q_proj", "experts.down_proj"], quantized_experts=True)
    assert named.parameters == ["mlp.experts.down_proj"]
    from errors import InputError

    real = expert_lora.metadata.version
    monkeypatch.setattr(expert_lora.metadata, "version", lambda name: "0.22.0" if name == "peft" else real(name))
    with pytest.raises(InputError, match="routed experts"):
        resolve_targets(model, ["q_proj", "experts.down_proj"], quantized_experts=True)


def test_the_copy_of_peft_s_moe_remap_is_peft_s():
    from peft.utils.transformers_weight_conversion import _MOE_TARGET_MODULE_MAPPING

    from training.targets import PEFT_MOE_REMAPPED

    assert {k: frozenset(v) for k, v in _MOE_TARGET_MODULE_MAPPING.items()} == PEFT_MOE_REMAPPED


@pytest.mark.gpu
def test_a_real_shape_twin_loads_and_trains_on_a_gpu_as_planned(tmp_path):
    """bench/moe_shape_twin.py's GPU part: one 80B-shaped layer with all 512 experts, 4-bit, 3 steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.moe_shape_twin import build_twin, measure

    folder = build_twin(tmp_path / "twin", layers=1, experts=512)
    result = measure(folder, "cuda", steps=3)
    measured = result["measured"]
    assert measured["unquantized_expert_tensors"] == 0 and measured["within_tolerance"], measured
    assert measured["groups"]["routed_experts"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert result["cuda_max_allocated_after_load_gib"] < 8  # one layer: ~0.8 GiB experts + 1.2 GiB embeddings
    assert result["tokens_per_second"] > 0
