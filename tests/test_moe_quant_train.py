"""4-bit routed experts end to end: tiny Qwen3-Next and Qwen3-MoE train through ``handler.handler``
with quantization 4bit on a CPU (bitsandbytes 0.50 runs 4-bit there), and the adapter loads onto the
unquantized base with peft."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import small_job
from training.runtime import bitsandbytes_4bit_runs

pytestmark = pytest.mark.skipif(bitsandbytes_4bit_runs("cpu") is not None,
                                reason="bitsandbytes cannot run 4-bit on this CPU")


@pytest.fixture
def moe_volume(volume, model_factory):
    def add(family: str) -> str:
        model = model_factory(family)
        shutil.copytree(model, volume / "models" / model.name)
        return model.name

    return add


def _run(name: str, job_id: str, **hyperparameters):
    import handler

    return handler.handler({"id": job_id, "input": small_job(
        base_model=name, job_id=job_id, hyperparameters={"quantization": "4bit", "epochs": 3, **hyperparameters})})


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_moe"])
def test_4bit_moe_trains_with_quantized_experts_measured_as_planned(family, moe_volume, volume, capsys):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import cli
    from training.peft_setup import targets_as_written

    name = moe_volume(family)
    output = _run(name, f"q4-{family}")
    assert output.get("status") == "succeeded", output
    plan = output["memory_plan"]
    assert plan["quantization"] == "4bit" and plan["quantized_experts"] is True
    experts = plan["groups"]["routed_experts"]
    assert experts["quantized_parameters"] == experts["parameters"] > 0
    measured = plan["measured"]
    assert measured["unquantized_expert_tensors"] == 0 and measured["quantized_expert_tensors"] > 0
    assert measured["within_tolerance"] is True, measured
    assert abs(measured["ratio"] - 1) <= 0.10
    assert measured["bytes_by_dtype"]["uint8"] > 0  # packed 4-bit storage
    assert abs(measured["groups"]["routed_experts"]["ratio"] - 1) <= 0.10

    metrics = output["metrics"]
    assert metrics["last_loss"] < metrics["first_loss"]

    lora = output["lora"]
    assert not lora["target_parameters"]  # 4-bit experts carry no LoRA; 'auto' says so in the log
    assert "q_proj" in lora["target_modules"]
    assert not {"gate", "shared_expert_gate"} & set(lora["target_modules"])
    if family == "qwen3_next":
        assert {"in_proj_qkvz", "in_proj_ba", "out_proj", "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.down_proj"} <= set(lora["target_modules"])

    adapter = Path(output["adapter"]["uri"].removeprefix("file://"))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(".experts." in k for k in keys)
    if family == "qwen3_next":
        assert any("shared_expert.gate_proj.lora_A" in k for k in keys)

    # trained on the 4-bit base, it fits the unquantized one: verify says so, the manifest says how
    capsys.readouterr()
    assert cli.main(["verify", "--adapter", str(adapter), "--base", str(volume / "models" / name), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"
    assert json.loads((adapter / "manifest.json").read_text())["runtime"]["quantization"] == "4bit"

    base = AutoModelForCausalLM.from_pretrained(volume / "models" / name, dtype=torch.float32)
    with targets_as_written():
        model = PeftModel.from_pretrained(base, str(adapter))
    loaded = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(keys)  # every saved tensor has its place, no expert LoRA appeared
    state = model.state_dict()
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in keys:
            target = next(n for n in state if n.replace(".default", "") == key)
            assert torch.equal(state[target].float(), f.get_tensor(key).float())


def test_expert_lora_on_4bit_experts_is_refused_before_loading(moe_volume, monkeypatch):
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    name = moe_volume("qwen3_next")
    output = _run(name, "q4-expert-lora", target_modules=["q_proj", "mlp.experts.gate_up_proj"])
    assert "error" in output
    assert output["error"].startswith("input:")
    assert "routed experts" in output["error"] and "quantization 'none'" in output["error"]
