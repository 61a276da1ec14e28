"""The memory plan: Qwen3-Next-80B-A3B counted from its published shape (config only, meta device)."""

from __future__ import annotations

import json
import time

import pytest
import transformers

import handler
from config.job import TrainingJob
from demo.tiny_models import QWEN3_NEXT_80B
from errors import InputError, TrainingError
from models.safetensors import safetensors_headers
from tests.conftest import small_job
from training.memory_plan import GiB, plan_memory, require_fit
from training.moe_quant import nf4_bytes


@pytest.fixture(scope="module")
def qwen3_next_80b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-next-80b")
    transformers.Qwen3NextConfig(**QWEN3_NEXT_80B).save_pretrained(folder)  # no weights at all
    return folder


def hp(**overrides):
    return TrainingJob.from_payload({"dataset": "d.jsonl", "hyperparameters": overrides}).hyperparameters


def test_qwen3_next_80b_weights_by_group_as_bitsandbytes_stores_them(qwen3_next_80b):
    h100 = [80 * GiB]
    bf16 = plan_memory(qwen3_next_80b, hp(quantization="none"), cuda=True, devices=h100)
    groups = {name: g.parameters / 1e9 for name, g in bf16.groups.items()}
    assert bf16.parameters / 1e9 == pytest.approx(79.7, abs=0.05)
    assert groups["routed_experts"] == pytest.approx(77.3, abs=0.05)
    assert groups["linear_attention"] == pytest.approx(1.21, abs=0.01)
    assert groups["embeddings"] == pytest.approx(0.62, abs=0.01)
    assert groups["attention"] == pytest.approx(0.33, abs=0.01)
    assert groups["shared_experts"] == pytest.approx(0.15, abs=0.01)
    assert groups["routers"] == pytest.approx(0.05, abs=0.01)
    assert bf16.weight_bytes / GiB == pytest.approx(148.4, abs=0.5)

    q4 = plan_memory(qwen3_next_80b, hp(quantization="4bit"), cuda=True, devices=h100)
    # 4-bit quantizes the fused routed experts too (while loading), at bitsandbytes' NF4 bytes.
    experts = q4.groups["routed_experts"]
    assert q4.quantized_experts and experts.quantized_parameters == experts.parameters
    assert experts.bytes == sum(nf4_bytes(n) for n in (512 * 1024 * 2048, 512 * 2048 * 512)) * 48
    assert experts.bytes / GiB == pytest.approx(37.14, abs=0.01)
    attention = q4.groups["attention"]  # all but the q/k norms
    assert 0.999 < attention.quantized_parameters / attention.parameters < 1
    # what stays unquantized is fp32 after peft's k-bit preparation: embeddings and lm_head 0.62 B × 4
    assert q4.groups["embeddings"].bytes == q4.groups["embeddings"].parameters * 4
    assert 40 < q4.weight_bytes / GiB < 41
    assert q4.fits and q4.strategy == "single"
    assert "routed experts 37.1 GiB in 4-bit" in q4.summary()
    # no LoRA on 4-bit experts: 'auto' adapts the rest, in TRL's bf16 QLoRA adapter
    assert q4.expert_lora_parameters == 0 and q4.lora_bytes == q4.lora_parameters * 8
    assert q4.lora_parameters < 0.05e9
    # one MoE layer's experts dequantized twice over (forward recompute and backward), in bf16
    assert q4.expert_dequant_bytes == 2 * 512 * 2048 * 1536 * 2
    # what naming the experts would take: in 4-bit more than one 80 GiB GPU holds, in 16 bits four of them
    assert "with the experts in 4-bit: 85 GiB on one device" in q4.expert_lora
    assert "needs a GPU of at least 93 GiB" in q4.expert_lora and "4 GPUs of 80 GiB with FSDP" in q4.expert_lora

    # LoRA r=16 on every expert: 512 experts × 48 layers of rank-16 blocks, with AdamW state.
    assert bf16.lora_parameters / 1e9 == pytest.approx(2.24, abs=0.01)
    assert bf16.lora_bytes == bf16.lora_parameters * 16
    assert bf16.activation_bytes_with_checkpointing < bf16.activation_bytes_without_checkpointing


def test_a_job_that_cannot_fit_fails_with_figures_and_what_would(qwen3_next_80b):
    plan = plan_memory(qwen3_next_80b, hp(quantization="none"), cuda=True, devices=[80 * GiB])
    assert not plan.fits and plan.quantization == "none"
    with pytest.raises(TrainingError) as info:
        require_fit(plan)
    message = str(info.value)
    assert message.startswith("this job does not fit on 1 GPU(s) of 80 GiB: qwen3_next needs about ")
    assert "weights 148.4 GiB" in message and "what would fit: " in message
    assert "GPUs of 80 GiB with FSDP in bf16" in message
    assert "quantization '4bit' with the routed experts in 4-bit and frozen" in message

    auto = plan_memory(qwen3_next_80b, hp(), cuda=True, devices=[80 * GiB])
    assert auto.fits and auto.quantization == "4bit"  # auto: 16 bits does not fit one 80 GiB GPU, 4-bit does

    four = plan_memory(qwen3_next_80b, hp(), cuda=True, devices=[80 * GiB] * 4)
    assert four.fits and four.strategy == "fsdp" and four.quantization == "none"
    assert four.per_device_bytes < 80 * GiB * 0.92


def test_auto_quantization_picks_none_if_it_fits_else_4bit_else_reports(model_factory):
    # wide enough that 4-bit layers outweigh the fp32 embeddings peft's k-bit preparation leaves
    dense = model_factory("llama", hidden_size=256)
    roomy = plan_memory(dense, hp(), cuda=True, devices=[80 * GiB])
    assert roomy.fits and roomy.quantization == "none" and roomy.strategy == "single"
    # A GPU just too small for 16-bit weights but big enough for 4-bit ones.
    need_4bit = plan_memory(dense, hp(quantization="4bit"), cuda=True, devices=[80 * GiB]).per_device_bytes
    assert need_4bit < roomy.per_device_bytes
    small = int((need_4bit + roomy.per_device_bytes) / 2 / 0.92)
    plan = plan_memory(dense, hp(), cuda=True, devices=[small])
    assert plan.fits and plan.quantization == "4bit"
    assert plan_memory(dense, hp(), cuda=False, devices=[64 * GiB]).quantization == "none"  # never on CPU


def test_headers_are_read_without_the_weights(model_factory):
    folder = model_factory("qwen3_next")
    headers = safetensors_headers(folder)
    assert headers["model.layers.0.mlp.experts.0.gate_proj.weight"] == ("F32", [32, 64])
    plan = plan_memory(folder, hp(), cuda=False, devices=[8 * GiB])
    assert plan.stored_bytes == sum(f.stat().st_size for f in folder.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in folder.glob("*.safetensors"))
    assert plan.fits and plan.device == "cpu"


def test_the_plan_is_in_the_output_and_a_too_big_job_fails_in_seconds(volume, monkeypatch):
    import train_lora
    from training import memory_plan

    output = handler.handler({"id": "p", "input": small_job(job_id="planned")})
    assert output["memory_plan"]["fits"] is True and output["memory_plan"]["device"] == "cpu"
    assert output["memory_plan"]["parameters"] > 0 and output["memory_plan"]["lora_parameters"] > 0

    monkeypatch.setattr(memory_plan, "detect_devices", lambda: (False, [1024**2]))  # a 1 MiB machine
    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    started = time.monotonic()
    failed = handler.handler({"id": "p2", "input": small_job(job_id="too-big")})
    assert failed["error"].startswith("train: this job does not fit on 0 GiB of RAM (no GPU): ")
    assert time.monotonic() - started < 30
    assert json.dumps(failed).count("GiB") >= 3


EXPERTS = ["q_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_expert_lora_on_4bit_experts_is_planned_with_its_adapter_and_working_set(qwen3_next_80b):
    frozen = plan_memory(qwen3_next_80b, hp(quantization="4bit", target_modules=["q_proj"]), cuda=True,
                         devices=[80 * GiB])
    plan = plan_memory(qwen3_next_80b, hp(quantization="4bit", target_modules=EXPERTS), cuda=True,
                       devices=[80 * GiB])
    assert plan.quantized_experts and plan.quantization == "4bit"
    # r=16 on every expert: 48 layers × 512 experts × 16 × ((2048 + 1024) + (2048 + 512))
    assert plan.expert_lora_parameters == 48 * 512 * 16 * (3072 + 2560)
    assert plan.lora_parameters == frozen.lora_parameters + plan.expert_lora_parameters
    assert plan.lora_bytes == plan.lora_parameters * 8  # TRL's bf16 adapter under QLoRA
    layer = 512 * 2048 * 1536  # one MoE layer's experts: gate_up [E, 2I, H] + down [E, H, I]
    # dequantized W twice (forward recompute, backward), plus the adapted W + BA and its gradient, bf16
    assert frozen.expert_dequant_bytes == 2 * layer * 2 and plan.expert_dequant_bytes == 4 * layer * 2
    assert plan.weight_bytes == frozen.weight_bytes
    assert plan.per_device_bytes - frozen.per_device_bytes == (
        plan.lora_bytes - frozen.lora_bytes + plan.expert_dequant_bytes - frozen.expert_dequant_bytes)
    assert not plan.fits and 84 * GiB < plan.per_device_bytes < 86 * GiB
    h200 = plan_memory(qwen3_next_80b, hp(quantization="4bit", target_modules=EXPERTS), cuda=True,
                       devices=[141 * GiB])
    assert h200.fits and h200.strategy == "single"
    # auto: 16 bits on one GPU does not fit, 4-bit with expert LoRA on an H200 does
    auto = plan_memory(qwen3_next_80b, hp(target_modules=EXPERTS), cuda=True, devices=[141 * GiB])
    assert auto.fits and auto.quantization == "4bit" and auto.expert_lora_parameters > 2e9


def test_expert_lora_on_4bit_is_refused_with_another_peft_and_keeps_auto_in_16_bits(qwen3_next_80b, monkeypatch):
    from training import expert_lora

    real = expert_lora.metadata.version
    monkeypatch.setattr(expert_lora.metadata, "version", lambda name: "0.22.0" if name == "peft" else real(name))
    with pytest.raises(InputError) as info:
        plan_memory(qwen3_next_80b, hp(quantization="4bit", target_modules=EXPERTS), cuda=True,
                    devices=[80 * GiB])
    assert "routed experts" in str(info.value) and "quantization 'none'" in str(info.value)
    assert "peft 0.22.0 is installed" in str(info.value)
    plan = plan_memory(qwen3_next_80b, hp(target_modules=EXPERTS), cuda=True, devices=[141 * GiB])
    assert plan.quantization == "none" and not plan.fits and "needs the experts in 16 bits" in plan.expert_lora
    plan = plan_memory(qwen3_next_80b, hp(target_modules=EXPERTS), cuda=True, devices=[80 * GiB] * 4)
    assert plan.quantization == "none" and plan.expert_lora_parameters > 2e9
