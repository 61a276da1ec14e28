"""``python cli.py plan``: will a job fit these GPUs, from config.json alone (no weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from demo.tiny_models import QWEN3_NEXT_80B

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3-next-80b-config")
    transformers.Qwen3NextConfig(**QWEN3_NEXT_80B).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no weights at all
    return folder


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", "plan", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def _json_and_words(stdout: str) -> tuple[dict, str]:
    decoder = json.JSONDecoder()
    document, end = decoder.raw_decode(stdout)
    return document, stdout[end:]


def test_qwen3_next_80b_on_one_80_gib_gpu(config_only):
    done = _plan("--base", str(config_only), "--gpus", "1x80")
    assert done.returncode == 0, done.stderr
    plan, words = _json_and_words(done.stdout)
    assert plan["options"]["none"]["fits"] is False  # bf16 LoRA does not fit one 80 GiB GPU
    assert plan["options"]["4bit"]["fits"] is True  # 4-bit, experts frozen, does
    assert plan["quantization"] == "4bit" and plan["fits"] and plan["quantized_experts"]
    assert plan["groups_gib"]["routed_experts"] == pytest.approx(37.14, abs=0.01)
    assert "16-bit (quantization 'none'): " in words and "does not fit" in words
    assert "FITS on 1 GPU(s) of 80 GiB" in words and "routed_experts" in words
    # LoRA on the routed experts too: 4-bit experts can be adapted; one 80 GiB GPU is too small for it
    assert "LoRA on the routed experts (2.21 B parameters) with the experts in 4-bit: 85 GiB" in words
    assert "needs a GPU of at least 93 GiB" in words


def test_a_job_file_is_planned_with_expert_lora_on_4bit(config_only, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": {"dataset": "d.jsonl", "hyperparameters": {
        "quantization": "none", "max_seq_length": 1024}}}))
    done = _plan("--base", str(config_only), "--gpus", "4x80", "--input", str(job))
    assert done.returncode == 0, done.stderr
    plan, words = _json_and_words(done.stdout)
    assert plan["quantization"] == "none" and plan["strategy"] == "fsdp" and plan["fits"]
    assert "options" not in plan

    job.write_text(json.dumps({"dataset": "d.jsonl", "hyperparameters": {
        "quantization": "4bit", "target_modules": ["q_proj", "mlp.experts.gate_up_proj"]}}))
    one = _plan("--base", str(config_only), "--gpus", "1x80", "--input", str(job))
    assert one.returncode == 0, one.stderr
    plan, words = _json_and_words(one.stdout)
    assert plan["quantization"] == "4bit" and not plan["fits"] and plan["expert_lora_parameters"] > 1e9
    assert "DOES NOT FIT on 1 GPU(s) of 80 GiB" in words
    h200 = _plan("--base", str(config_only), "--gpus", "1x141", "--input", str(job))
    plan, words = _json_and_words(h200.stdout)
    assert plan["quantization"] == "4bit" and plan["fits"] and plan["expert_lora_parameters"] > 1e9


def test_bad_gpus_is_a_usage_error(config_only):
    done = _plan("--base", str(config_only), "--gpus", "80")
    assert done.returncode == 2 and "--gpus must be COUNTxGiB" in done.stderr


def test_the_80b_is_planned_without_torch_or_a_modeling_file(config_only):
    """The published families are planned from config.json alone: importing torch and a modeling file
    (about 5 s) would be the whole time budget of the command."""
    probe = ("import sys, cli\n"
             "rc = cli.main(['plan', '--base', sys.argv[1], '--gpus', '1x80'])\n"
             "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers.models')))\n"
             "print('LOADED', loaded, file=sys.stderr)\n"
             "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(config_only)], cwd=ROOT, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stderr
    plan, _ = _json_and_words(done.stdout)
    assert plan["options"]["none"]["fits"] is False and plan["options"]["4bit"]["fits"] is True


def test_a_broken_config_is_a_usage_error_naming_it(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    done = _plan("--base", str(tmp_path), "--gpus", "1x80")
    assert done.returncode == 2 and "could not read the model's config" in done.stderr
    assert str(tmp_path / "config.json") in done.stderr
