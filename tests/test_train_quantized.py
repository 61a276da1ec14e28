"""QLoRA: 4-bit NF4 base weights (bitsandbytes), LoRA on top.

bitsandbytes 0.50 runs 4-bit on a CPU too, so the path is tested here wherever it can run; the CUDA
test (marker `gpu`) runs the worker's real 4-bit job on a GPU machine.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from config.job import TrainingJob
from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
from tests.conftest import small_job
from train_lora import train_lora
from training.loading import load_base_model
from training.request import TrainRequest
from training.runtime import Runtime

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed")


def _bnb_runs_here(device: str) -> bool:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.ones(1, 64, device=device))
        return True
    except Exception:  # noqa: BLE001 - any failure means: this machine cannot run 4-bit
        return False


@needs_bnb
def test_4bit_quantizes_linear_layers_and_fused_experts(model_factory):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not _bnb_runs_here(device):
        pytest.skip(f"bitsandbytes cannot run 4-bit on {device} here")
    import bitsandbytes as bnb

    runtime = Runtime(device, "bf16" if device == "cuda" else "fp32", "4bit", False)
    model = load_base_model(model_factory("qwen3_next"), runtime)
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any(n.endswith("self_attn.q_proj") for n in quantized)
    assert any(n.endswith("linear_attn.in_proj_qkvz") for n in quantized)
    assert any(n.endswith("shared_expert.down_proj") for n in quantized)
    assert "lm_head" not in quantized
    experts = model.model.layers[0].mlp.experts
    # The fused routed experts are 4-bit too (training/moe_quant.py), dequantized on use.
    assert experts.parametrizations.gate_up_proj.original.dtype == torch.uint8
    assert experts.gate_up_proj.ndim == 3
    q = model.model.layers[3].self_attn.q_proj.weight
    assert q.quant_state.quant_type == "nf4" and q.quant_state.nested  # NF4 with double quantization


@needs_bnb
def test_qlora_trains_on_a_4bit_base(settings, tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not _bnb_runs_here(device):
        pytest.skip(f"bitsandbytes cannot run 4-bit on {device} here")
    job = TrainingJob.from_payload(small_job(hyperparameters={"max_steps": 6}))
    hp = job.hyperparameters
    model_dir = settings.models_root / "tiny-llama"
    tokenizer = load_tokenizer(model_dir)
    data = tokenize_dataset(read_dataset(job.dataset, settings, seed=hp.seed), tokenizer,
                            max_seq_length=hp.max_seq_length, train_on_inputs=False)
    runtime = Runtime(device, "bf16" if device == "cuda" else "fp32", "4bit", False)
    request = TrainRequest(model_path=model_dir, hyperparameters=hp, output_dir=tmp_path / "job",
                           checkpoint_dir=tmp_path / "ckpt", base_model_id="org/tiny-llama", runtime=runtime)
    result = train_lora(request, data, tokenizer=tokenizer)
    assert result.metrics["steps"] == 6
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
    # TRL keeps a quantized model's adapter in bf16 (QLoRA); the memory plan counts it that way.
    assert lora and all(p.requires_grad and p.dtype == torch.bfloat16 for p in lora)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
def test_cuda_job_trains_in_bf16_and_4bit_through_the_handler(volume):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import handler

    for quantization in ("none", "4bit"):
        output = handler.handler({"id": f"gpu-{quantization}", "input": small_job(
            job_id=f"gpu-{quantization}", hyperparameters={"quantization": quantization})})
        assert output["status"] == "succeeded", output
        plan = output["memory_plan"]
        assert plan["device"] == "cuda" and plan["quantization"] == quantization and plan["fits"]
        assert output["metrics"]["last_loss"] < output["metrics"]["first_loss"]
