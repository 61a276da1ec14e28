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


def _run(name: str, job_id: str, init_adapter: str | None = None, **hyperparameters):
    import handler

    extra = {"init_adapter": init_adapter} if init_adapter else {}
    return handler.handler({"id": job_id, "input": small_job(
        base_model=name, job_id=job_id, hyperparameters={"quantization": "4bit", "epochs": 3, **hyperparameters},
        **extra)})


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


EXPERT_TARGETS = ["q_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _dequantized_twin(model_dir: Path, quantized):
    """A plain fp32 model whose every weight is the 4-bit model's weight, dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            source = loaded.get(name)
            if isinstance(source, bnb.nn.Linear4bit):
                weight = bnb_functional.dequantize_4bit(source.weight.data, source.weight.quant_state)
                module.weight.copy_(weight.float())
            elif source is not None and type(source).__name__.endswith("Experts"):
                for tensor in ("gate_up_proj", "down_proj"):
                    getattr(module, tensor).copy_(getattr(source, tensor).float())
    return twin


def _logits(model, ids):
    # train(): bitsandbytes' CPU eval path needs out_features % 32 == 0, which in_proj_ba is not;
    # nothing here has dropout (LoRA on experts has none, the tiny models none), so train() == eval()
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_moe"])
def test_expert_lora_on_4bit_experts_trains_and_loads_onto_the_unquantized_base(family, moe_volume, volume,
                                                                                capsys):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import cli
    from training import expert_lora
    from training.loading import load_base_model
    from training.moe_quant import quantized_expert_parameters
    from training.peft_setup import adapted, targets_as_written, verify_adapted
    from training.runtime import Runtime
    from training.targets import Targets

    name = moe_volume(family)
    model_dir = volume / "models" / name
    output = _run(name, f"q4-experts-{family}", target_modules=EXPERT_TARGETS, learning_rate=1e-2)
    assert output.get("status") == "succeeded", output
    plan = output["memory_plan"]
    assert plan["quantization"] == "4bit" and plan["quantized_experts"] is True
    assert plan["expert_lora_parameters"] > 0 and plan["measured"]["within_tolerance"] is True
    assert sorted(output["lora"]["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert output["metrics"]["last_loss"] < output["metrics"]["first_loss"]

    # the saved adapter carries every expert tensor's LoRA, and training moved each lora_B off zero
    adapter = Path(output["adapter"]["uri"].removeprefix("file://"))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    runtime = Runtime(device="cpu", precision="fp32", quantization="4bit", gradient_checkpointing=True)
    quantized = load_base_model(model_dir, runtime)
    twin = _dequantized_twin(model_dir, quantized)  # before peft wraps its layers
    expert_tensors = quantized_expert_parameters(quantized)
    expert_keys = [k for k in saved if ".mlp.experts." in k]
    assert len(expert_keys) == 2 * len(expert_tensors) > 0  # lora_A and lora_B of each 4-bit tensor
    for key in expert_keys:
        assert saved[key].abs().sum() > 0, key
    assert {"lora_A", "lora_B"} == {k.rsplit(".", 2)[-2] for k in expert_keys}  # lora_B starts at zero

    # onto the 4-bit base again: the worker's loader adapts every expert tensor, and verify_adapted agrees
    with targets_as_written():
        trained = expert_lora.load_onto_quantized(quantized, str(adapter), is_trainable=False)
    modules, parameters = adapted(trained)
    assert parameters == sorted(expert_tensors)
    verify_adapted(trained, Targets(["q_proj"], ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]))
    ids = torch.randint(3, quantized.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    trained_logits = _logits(trained, ids)
    assert all(len(m.parametrizations[p]) == 1 for m in trained.modules() if type(m).__name__.endswith("Experts")
               for p in ("gate_up_proj", "down_proj"))  # no LoRA proxy left stacked on the 4-bit weight

    # stock peft onto the unquantized base: every saved tensor has its place
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with targets_as_written():
        plain = PeftModel.from_pretrained(base, str(adapter))
    state = plain.state_dict()
    placed = {n.replace(".default", ""): n for n in state if "lora_" in n}
    assert set(placed) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[placed[key]].float(), tensor.float()), key

    # on a base holding the 4-bit model's dequantized weights, the same logits as the trained model
    twin_base_logits = _logits(twin, ids)
    with targets_as_written():
        twin_adapted = PeftModel.from_pretrained(twin, str(adapter))
    twin_logits = _logits(twin_adapted, ids)
    assert (twin_logits - trained_logits).abs().max() <= 1e-6  # measured: 0.0 on both families
    assert (twin_base_logits - trained_logits).abs().max() > 1e-2  # the adapter, experts included, counts
    for module in twin_adapted.modules():  # the expert LoRA alone moves the logits too
        if type(module).__name__ == "ParamWrapper":
            module._disable_adapters = True
    assert (_logits(twin_adapted, ids) - trained_logits).abs().max() > 1e-3

    capsys.readouterr()
    assert cli.main(["verify", "--adapter", str(adapter), "--base", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"

    # merge loads the unquantized base (never the 4-bit one, where peft would drop the expert LoRA)
    merged_dir = volume / "merged" / family
    assert cli.main(["merge", "--adapter", str(adapter), "--base", str(model_dir), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, ids), _logits(plain, ids), rtol=1e-4, atol=1e-4)
    experts = next(m for m in merged.modules() if type(m).__name__.endswith("Experts"))
    original = next(m for m in base.modules() if type(m).__name__.endswith("Experts"))
    assert not torch.equal(experts.down_proj, original.down_proj)


def test_a_job_continues_expert_lora_from_its_init_adapter_on_the_4bit_base(moe_volume, volume):
    name = moe_volume("qwen3_moe")
    first = _run(name, "q4-init-1", target_modules=EXPERT_TARGETS, learning_rate=1e-2)
    assert first.get("status") == "succeeded", first
    first_dir = Path(first["adapter"]["uri"].removeprefix("file://"))
    init_ref = first_dir.relative_to(volume).as_posix()
    second = _run(name, "q4-init-2", target_modules=EXPERT_TARGETS, learning_rate=1e-2, init_adapter=init_ref)
    assert second.get("status") == "succeeded", second
    # it started where the first ended (every expert tensor loaded in place), and trained further
    assert second["metrics"]["first_loss"] < first["metrics"]["first_loss"] - 0.1, (first["metrics"], second["metrics"])
    second_dir = Path(second["adapter"]["uri"].removeprefix("file://"))
    with safe_open(str(first_dir / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(second_dir / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        experts = [k for k in a.keys() if ".mlp.experts." in k]
        assert experts and all(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in experts)


def test_expert_lora_on_4bit_experts_is_refused_before_loading_with_another_peft(moe_volume, monkeypatch):
    import train_lora
    from training import expert_lora

    real = expert_lora.metadata.version
    monkeypatch.setattr(expert_lora.metadata, "version", lambda name: "0.22.0" if name == "peft" else real(name))
    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    name = moe_volume("qwen3_next")
    output = _run(name, "q4-expert-lora", target_modules=["q_proj", "mlp.experts.gate_up_proj"])
    assert "error" in output
    assert output["error"].startswith("input:")
    assert "routed experts" in output["error"] and "quantization 'none'" in output["error"]
    assert "peft 0.21.2" in output["error"] and "peft 0.22.0 is installed" in output["error"]


def test_after_expert_lora_the_4bit_base_is_bare_again_for_a_warm_worker(model_factory):
    """Trained with expert LoRA and unloaded, the 4-bit base passes the warm cache's checks
    (training/base_cache.py): no LoRA hook left on an expert, no peft module, the same weights."""
    from peft import LoraConfig, get_peft_model

    from training import base_cache, expert_lora
    from training.loading import load_base_model
    from training.runtime import Runtime

    model_dir = model_factory("qwen3_moe")
    runtime = Runtime(device="cpu", precision="fp32", quantization="4bit", gradient_checkpointing=True)
    model = load_base_model(model_dir, runtime)
    was = base_cache.snapshot(model)
    expert_lora.install()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                        target_parameters=expert_lora.full_names(model, ["mlp.experts.gate_up_proj",
                                                                         "mlp.experts.down_proj"]))
    wrapped = get_peft_model(model, config)
    assert expert_lora.renest(wrapped) > 0  # the 4-bit order differs from the plain one
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second step is where a stacked LoRA hook used to fail
        wrapped(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if ".experts." in n and "lora_" in n}
    # every expert tensor's LoRA is in the graph; lora_B (zero at the start) gets the signal first
    assert len(grads) == 4 * 2 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    bare = base_cache.strip_adapter(model, wrapped)
    base_cache.restore(bare, was)
    assert base_cache.problems(bare, was) == []
    assert all(len(m.parametrizations[p]) == 1 for m in bare.modules() if type(m).__name__.endswith("Experts")
               for p in ("gate_up_proj", "down_proj"))
