"""The GPU path, on a real CUDA card: `make test-gpu` (and scripts/gpu-check.sh) runs these.

On a machine without CUDA every test here skips with the reason (``-rs`` shows it). Each one runs the
worker's own code on the GPU: bf16 LoRA (a tiny model and a ~230M-parameter Llama shape), 4-bit QLoRA,
the Qwen3-Next path under 4-bit, padding-free against padded batches per attention implementation,
the memory plan against ``torch.cuda.max_memory_allocated``, and a cancel and a resume.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import small_job

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason=f"needs a CUDA GPU; torch {torch.__version__} sees none here"),
]
MEMORY_TOLERANCE = 0.15
PACKED_TOLERANCE = 0.015  # bf16 logits; the same computation in fp32 on a CPU agrees exactly


def _manifest(output: dict) -> dict:
    """The adapter's manifest.json, from the job output's file:// uri (the local artifact store)."""
    uri = output["adapter"]["uri"]
    assert uri.startswith("file://"), uri
    return json.loads((Path(uri.removeprefix("file://")) / "manifest.json").read_text())


def _run(job: dict, job_id: str) -> dict:
    import handler

    output = handler.handler({"id": job_id, "input": job})
    assert "error" not in output, output["error"]
    assert output["status"] == "succeeded"
    return output


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def test_bf16_lora_on_a_tiny_model_moves_only_lora_weights_on_the_gpu(settings, tmp_path):
    from tests.test_train import _train

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16: the worker trains in fp16 here")
    result, snapshot, _ = _train(settings, settings.models_root / "tiny-llama", tmp_path)
    model = result.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and base
    assert all(p.device.type == "cuda" for p in model.parameters())
    for name, param in lora.items():
        assert not torch.equal(param.detach(), snapshot.before[name]), f"LoRA weight {name} did not move"
    for name, param in base.items():
        assert torch.equal(param.detach(), snapshot.before[name]), f"base weight {name} changed"
    assert result.metrics["last_loss"] < result.metrics["first_loss"]


def test_bf16_lora_through_the_worker(volume):
    output = _run(small_job(job_id="gpu-bf16"), "gpu-bf16")
    runtime = _manifest(output)["runtime"]
    assert runtime["device"] == "cuda"
    assert runtime["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert runtime["quantization"] == "none"
    assert output["metrics"]["last_loss"] < output["metrics"]["first_loss"]


def test_qlora_4bit_on_cuda(volume):
    output = _run(small_job(job_id="gpu-qlora", hyperparameters={"quantization": "4bit"}), "gpu-qlora")
    assert _manifest(output)["runtime"]["quantization"] == "4bit"
    assert output["metrics"]["last_loss"] < output["metrics"]["first_loss"]


def test_qwen3_next_under_4bit_trains_on_cuda(volume, model_factory):
    """The quantized mixture-of-experts path on a tiny Qwen3-Next (linear attention, fused experts)."""
    shutil.copytree(model_factory("qwen3_next"), volume / "models" / "tiny-qwen3-next")
    job = small_job(job_id="gpu-qwen3-next", base_model="tiny-qwen3-next",
                    hyperparameters={"quantization": "4bit"})
    output = _run(job, "gpu-qwen3-next")
    manifest = _manifest(output)
    assert manifest["runtime"]["quantization"] == "4bit"
    assert output["lora"]["target_modules"], output["lora"]
    assert output["metrics"]["last_loss"] < output["metrics"]["first_loss"]


def _attention_implementations() -> list[str]:
    found = ["eager", "sdpa"]
    try:
        import flash_attn  # noqa: F401

        found.append("flash_attention_2")
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("implementation", _attention_implementations())
def test_padding_free_gives_the_padded_loss(tiny_llama, implementation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16,
                                                 attn_implementation=implementation).cuda().eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 17, 33, 9, 64]
    vocab = model.config.vocab_size
    seqs = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    pad = model.config.pad_token_id or 0

    # Padded: one row per example, right-padded, pads masked out of attention and loss.
    width = max(lengths)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    # Padding-free: one row of every example back to back, positions restarting at 0, no mask;
    # each example's first token is not predicted from the previous example's last.
    flat = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    flat_labels = flat.clone()
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    flat_labels[0, starts] = -100

    # use_cache=False: transformers reads packed sequences from position ids only without a cache
    # (masking_utils); with one, the examples would attend to each other.
    with torch.no_grad():
        padded = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda(), use_cache=False).loss
        packed = model(input_ids=flat.cuda(), position_ids=positions.cuda(), labels=flat_labels.cuda(),
                       use_cache=False).loss
        crossed = model(input_ids=flat.cuda(), labels=flat_labels.cuda(), use_cache=False).loss
    padded, packed, crossed = float(padded), float(packed), float(crossed)
    print(f"{implementation}: padded {padded:.5f} padding-free {packed:.5f} attending across {crossed:.5f}")
    assert abs(padded - packed) < PACKED_TOLERANCE, (implementation, padded, packed)
    # The comparison can tell: examples that attend to each other give another loss (fp32 CPU: 0.05).
    assert abs(padded - crossed) > PACKED_TOLERANCE, (implementation, padded, crossed)


def test_a_few_hundred_million_parameter_llama_trains_in_bf16_within_its_memory_plan(volume, model_factory):
    """A Llama shape of about 230M parameters (hidden 1024, 24 layers) through the worker, its peak CUDA
    memory against the plan's figure (weights, LoRA state, activations and logits: the plan minus its
    fixed CUDA-context allowance, which torch's allocator does not see)."""
    big = model_factory("llama", hidden_size=1024, layers=24)
    shutil.copytree(big, volume / "models" / "llama-230m")
    words = "the model learns what its data shows it and the loss falls as it does".split()
    records = [{"text": " ".join(words[(i + j) % len(words)] for j in range(900))} for i in range(48)]
    job = {"job_id": "gpu-230m", "base_model": "llama-230m",
           "dataset": {"records": records, "format": "text"},
           "hyperparameters": {"max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 1,
                               "max_seq_length": 512, "packing": False, "learning_rate": 1e-3,
                               "logging_steps": 1, "quantization": "none"}}
    _free_cuda()
    before = torch.cuda.memory_allocated()
    output = _run(job, "gpu-230m")
    peak = torch.cuda.max_memory_allocated() - before
    plan = output["memory_plan"]
    assert plan["device"] == "cuda" and 200e6 < plan["parameters"] < 300e6, plan["parameters"]
    predicted = plan["per_device_bytes"] - plan["overhead_bytes"]
    ratio = predicted / peak
    print(f"memory plan {predicted / 2**30:.2f} GiB, measured peak {peak / 2**30:.2f} GiB, ratio {ratio:.3f}")
    assert abs(ratio - 1) <= MEMORY_TOLERANCE, (
        f"the memory plan says {predicted / 2**30:.2f} GiB, torch.cuda.max_memory_allocated {peak / 2**30:.2f} GiB")


def test_a_cancel_on_cuda_keeps_a_checkpoint_and_the_rerun_resumes(volume):
    import handler
    from storage.records import SqliteRecords

    job = small_job(job_id="gpu-cancel", hyperparameters={"epochs": 200})  # 800 steps
    records = SqliteRecords(volume / "records.sqlite3")

    async def run_and_cancel():
        task = asyncio.create_task(handler.async_handler({"id": "c", "input": job}))
        deadline = time.monotonic() + 300
        while True:
            await asyncio.sleep(0.02)
            row = records.get_job("gpu-cancel")
            if row and (row.get("current_step") or 0) >= 3:
                break
            assert time.monotonic() < deadline and not task.done(), task.done() and task.result()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_and_cancel())
    row = records.get_job("gpu-cancel")
    assert row["status"] == "cancelled", row
    stopped_at = int(row["error"].split("at step ")[1].split()[0])
    assert 3 <= stopped_at < 800
    done = _run(job, "c2")
    assert done["metrics"]["resumed_from_step"] == stopped_at
    assert done["metrics"]["steps"] == 800
