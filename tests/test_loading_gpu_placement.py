"""How a base model is asked of transformers on a GPU: straight onto its device, flash attention when
flash-attn is usable, sdpa when the model class refuses it. Checked on the CPU by capturing the
arguments ``from_pretrained`` receives (the GPU itself is exercised by the gpu-marked tests)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import transformers

from training import loading
from training.runtime import Runtime

GPU_BF16 = Runtime("cuda", "bf16", "none", False)


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []
    refuse = {"flash": False}

    def from_pretrained(path, **kwargs):
        seen.append(kwargs)
        if kwargs.get("attn_implementation") == "flash_attention_2" and refuse["flash"]:
            raise ValueError("FooForCausalLM does not support Flash Attention 2.0 yet.")
        return SimpleNamespace(config=SimpleNamespace(use_cache=True))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return seen, refuse


def _kernels(monkeypatch, found):
    monkeypatch.setattr(loading, "detect_kernels", lambda cuda=None: dict(found))


def test_a_single_gpu_job_loads_onto_its_device_with_flash_attention(calls, monkeypatch, tmp_path):
    calls, _ = calls
    _kernels(monkeypatch, {"flash-attn": "2.8.3"})
    model = loading.load_base_model(tmp_path, GPU_BF16, local_rank=0)
    assert calls[0]["device_map"] == {"": 0}
    assert calls[0]["attn_implementation"] == "flash_attention_2"
    assert model.config.use_cache is False


def test_without_flash_attn_it_is_sdpa(calls, monkeypatch, tmp_path):
    calls, _ = calls
    _kernels(monkeypatch, {})
    loading.load_base_model(tmp_path, GPU_BF16)
    assert calls[0]["attn_implementation"] == "sdpa"


def test_ranks_that_share_the_model_load_on_the_host(calls, monkeypatch, tmp_path):
    calls, _ = calls
    _kernels(monkeypatch, {})
    loading.load_base_model(tmp_path, GPU_BF16, local_rank=1, world_size=2)
    assert "device_map" not in calls[0]  # FSDP places the shards


def test_a_model_without_flash_attention_support_falls_back_to_sdpa(calls, monkeypatch, tmp_path):
    _kernels(monkeypatch, {"flash-attn": "2.8.3"})
    calls, refuse = calls
    refuse["flash"] = True
    loading.load_base_model(tmp_path, GPU_BF16)
    assert [c["attn_implementation"] for c in calls] == ["flash_attention_2", "sdpa"]


def test_the_cpu_keeps_transformers_defaults(calls, monkeypatch, tmp_path):
    calls, _ = calls
    _kernels(monkeypatch, {"flash-attn": "2.8.3"})
    loading.load_base_model(tmp_path, Runtime("cpu", "fp32", "none", False))
    assert "device_map" not in calls[0] and "attn_implementation" not in calls[0]
