"""A warm worker keeps the base model between jobs with the same base, and it changes nothing.

Jobs run through ``handler.handler`` in this one process, as on a warm RunPod worker: the second
job with the same base wraps a fresh adapter around the kept base instead of loading it, and the
adapter it trains is the adapter a cold worker trains for that job alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import handler
from tests.conftest import small_job


@pytest.fixture
def cache(volume):
    """The worker's cache, empty at the start and end of each test (a cold worker)."""
    base_cache = handler.get_base_cache()
    base_cache.clear("test start")
    yield base_cache
    base_cache.clear("test end")


def _run(job_id: str, **overrides) -> dict:
    output = handler.handler({"id": job_id, "input": small_job(job_id=job_id, **overrides)})
    assert "error" not in output, output
    return output


def _adapter(output: dict) -> dict[str, torch.Tensor]:
    folder = Path(output["adapter"]["uri"].removeprefix("file://"))
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_the_second_job_reuses_the_base_and_trains_what_a_cold_worker_trains(cache, volume, model_factory,
                                                                            monkeypatch):
    import train_lora

    # a model whose load takes long enough to time (tenths of a second) against a skipped one
    shutil.copytree(model_factory("llama", hidden_size=256, layers=4), volume / "models" / "llama-256")
    loads = []
    real_load = train_lora.load_base_model
    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    short = {"base_model": "llama-256", "dataset": {"uri": "datasets/capitals.jsonl", "max_examples": 16}}
    first = _run("warm-1", **short)
    second = _run("warm-2", **short, hyperparameters={"seed": 7})
    assert (first["base_model"]["load"]["reused"], second["base_model"]["load"]["reused"]) == (False, True)
    assert len(loads) == 1  # the second job read no weights
    assert second["timings"]["load_s"] < 0.05 * first["timings"]["load_s"], (first["timings"], second["timings"])

    cache.clear("a cold worker")
    cold = _run("cold-2", **short, hyperparameters={"seed": 7})
    assert len(loads) == 2
    assert cold["base_model"]["load"]["reused"] is False
    _assert_same_adapter(_adapter(second), _adapter(cold))
    # the seed really matters here: the check above could not pass by training nothing
    assert not torch.equal(_adapter(first)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                           _adapter(second)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_a_different_base_is_loaded_fresh_and_frees_the_kept_one(cache, volume, model_factory):
    shutil.copytree(model_factory("qwen2"), volume / "models" / "tiny-qwen2")
    llama = _run("llama-1")
    qwen = _run("qwen-1", base_model="tiny-qwen2")
    assert (llama["base_model"]["load"]["reused"], qwen["base_model"]["load"]["reused"]) == (False, False)
    assert Path(cache.key.path).name == "tiny-qwen2"  # the llama was freed, not kept beside it


class _FailAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom at step 2")


def test_a_job_that_fails_mid_training_leaves_a_clean_base(cache, monkeypatch):
    import train_lora

    cold = _run("clean-1")
    real = train_lora.train_lora
    monkeypatch.setattr(train_lora, "train_lora",
                        lambda *a, callbacks=None, **k: real(*a, callbacks=[*(callbacks or []), _FailAtStep()], **k))
    failed = handler.handler({"id": "boom", "input": small_job(job_id="boom")})
    assert "boom at step 2" in failed["error"], failed
    monkeypatch.setattr(train_lora, "train_lora", real)

    after = _run("clean-2")  # the same job as the first: the same adapter, whether the base was kept or not
    assert after["base_model"]["load"]["reused"] is True  # the failed job's adapter was taken out, checked
    _assert_same_adapter(_adapter(cold), _adapter(after))


def test_warm_model_cache_false_never_reuses(cache, monkeypatch):
    monkeypatch.setenv("WARM_MODEL_CACHE", "false")
    handler.get_settings.cache_clear()
    outputs = [_run("off-1"), _run("off-2")]
    assert [o["base_model"]["load"]["reused"] for o in outputs] == [False, False]
    assert cache.key is None


def _lease_and_train(tiny_llama, cache, *, merge: bool):
    """Lend the base to a fake job that wraps an adapter with non-zero weights (merged into the base or not)."""
    from peft import LoraConfig, get_peft_model

    from training.base_cache import base_key
    from training.loading import load_base_model
    from training.runtime import Runtime

    runtime = Runtime("cpu", "fp32", "none", False)
    key = base_key(tiny_llama, None, "sha256:x", tiny_llama, runtime, False)
    with cache.lease(key) as lease:
        lease.hold(load_base_model(tiny_llama, runtime))
        lease.wrapped = get_peft_model(lease.model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        if merge:
            lease.wrapped.merge_adapter()  # what must never happen: the adapter written into the base weights
    return key


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_a_base_that_came_back_changed_is_not_kept(tiny_llama, cache, merge):
    key = _lease_and_train(tiny_llama, cache, merge=merge)
    assert cache.key == (None if merge else key)
    if not merge:
        with cache.lease(key) as lease:
            assert lease.reused
            assert not any("lora" in name for name, _ in lease.model.named_parameters())
            assert all(p.requires_grad for p in lease.model.parameters())  # as from_pretrained gives it


def test_weights_replaced_in_place_or_other_load_settings_are_another_base(tiny_llama, cache, tmp_path):
    from training.base_cache import base_key
    from training.runtime import Runtime

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    fp32 = Runtime("cpu", "fp32", "none", False)
    key = base_key(folder, None, "sha256:x", folder, fp32, False)
    assert base_key(folder, None, "sha256:x", folder, fp32, False) == key
    assert base_key(folder, "main", "sha256:x", folder, fp32, False) != key
    assert base_key(folder, None, "sha256:x", folder, Runtime("cpu", "fp32", "none", True), False) != key
    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten with the same size
    assert base_key(folder, None, "sha256:x", folder, fp32, False) != key


def test_a_mixture_of_experts_base_is_kept_too(cache, volume, model_factory):
    """TRL turns the config's output_router_logits on for an MoE model's auxiliary loss: the kept base gets
    its config back as loaded, so the next job reuses it (before, every MoE job loaded afresh)."""
    shutil.copytree(model_factory("qwen3_moe"), volume / "models" / "tiny-moe")
    first = _run("moe-1", base_model="tiny-moe")
    second = _run("moe-2", base_model="tiny-moe", hyperparameters={"seed": 7})
    assert (first["base_model"]["load"]["reused"], second["base_model"]["load"]["reused"]) == (False, True)
    kept = cache._model
    assert kept is not None and kept.config.output_router_logits is False
