"""The GPU section of the benchmark (bench/gpu.py): its FLOPs and MFU arithmetic, the card table, the
clean skip without CUDA, and a part that overruns its timeout leaving what it printed.

The whole section end to end on a CPU (`python bench/gpu.py --shape tiny --device cpu`, about 50 s here)
is the rehearsal in scripts/gpu-check.sh, not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_flops import (
    LLAMA3_8B,
    llama_counts,
    lora_training_flops,
    mfu,
    peak_for,
    peak_or_reason,
)

ROOT = Path(__file__).resolve().parent.parent


def test_llama3_8b_counts_match_the_published_model():
    counts = llama_counts(LLAMA3_8B, lora_r=16)
    # per layer: q, o 4096×4096 each; k, v 4096×1024 each; gate, up, down 4096×14336 each
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert per_layer == 218_103_808
    assert counts.frozen_matmul == 32 * per_layer + 4096 * 128256 == 7_504_658_432
    # plus the input embedding and the norms: Llama-3-8B's 8,030,261,248 parameters
    assert counts.total == 8_030_261_248
    # LoRA r 16 on the seven projections: 16 × (in + out) each, 32 layers (the memory plan's count too)
    assert counts.lora == 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3) == 41_943_040
    assert (counts.layers, counts.attention_width) == (32, 4096)


def test_lora_training_flops_by_hand():
    # hidden 8, 1 layer, 2 heads of 4 (1 kv head), MLP 16, vocab 10, LoRA r 2; examples of 3 and 5 tokens
    config = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=16, vocab_size=10, tie_word_embeddings=False)
    counts = llama_counts(config, lora_r=2)
    # q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 128 = 576, and the LM head 80
    assert counts.frozen_matmul == 656
    assert counts.lora == 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) == 256
    assert counts.total == 576 + 80 + 80 + 2 * 8 + 8  # + the input embedding, 2 norms a layer and the last
    # 4·656·8 + 6·256·8 + 12·1·8·(3² + 5²) = 20,992 + 12,288 + 3,264
    assert lora_training_flops(counts, [3, 5]) == 36_544


def test_tied_embeddings_have_no_separate_head_weights_but_still_multiply():
    tied = llama_counts(dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=16, vocab_size=10, tie_word_embeddings=True), lora_r=2)
    assert tied.total == 576 + 80 + 2 * 8 + 8
    assert tied.frozen_matmul == 656


@pytest.mark.parametrize("name, card, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", "GH200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L40", "L40", 181.05),
    ("NVIDIA RTX A6000", "RTX A6000", 154.8),
    ("NVIDIA A40", "A40", 149.7),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", 364.2),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ("NVIDIA L4", "L4", 121.0),
])
def test_peak_table(name, card, tflops):
    peak = peak_for(name)
    assert (peak.card, peak.tflops) == (card, tflops)
    assert "datasheet" in peak.source or "whitepaper" in peak.source


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090 D", "Tesla T4", "NVIDIA GeForce RTX 3090", "", None])
def test_a_card_not_in_the_table_has_no_peak(name):
    assert peak_for(name) is None


def test_mfu_is_flops_over_seconds_over_the_peak_and_null_with_its_reason_otherwise():
    peak, reason = peak_or_reason("cuda", "NVIDIA H200")
    assert reason is None
    assert mfu(989.4e12 * 3, 6.0, peak) == pytest.approx(0.5)
    assert mfu(1e12, 0.0, peak) is None

    unknown, reason = peak_or_reason("cuda", "NVIDIA B9000")
    assert unknown is None and "'NVIDIA B9000' is not in" in reason and "PEAKS" in reason
    assert mfu(1e12, 1.0, unknown) is None

    cpu, reason = peak_or_reason("cpu", None)
    assert cpu is None and "on cpu" in reason


def _python_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def test_without_cuda_the_section_is_skipped_with_its_reason(tmp_path):
    out = tmp_path / "gpu-bench.json"
    # No visible GPU even on a GPU machine: the skip path itself is under test.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(out)],
                          env=_python_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(last) == ["gpu"] and list(last["gpu"]) == ["skipped"]
    assert "no CUDA device" in last["gpu"]["skipped"]
    assert json.loads(out.read_text()) == last["gpu"]
    assert out.with_suffix(".md").read_text().startswith("GPU section skipped: no CUDA device")


def test_run_py_hook_skips_without_cuda_or_when_off(tmp_path, monkeypatch):
    from bench import gpu

    monkeypatch.setattr(gpu, "detect_device", lambda requested: (None, "no CUDA device: test"))
    assert gpu.section("auto", tmp_path / "g.json") == {"skipped": "no CUDA device: test"}
    assert gpu.section("off", tmp_path / "g.json") == {"skipped": "--gpu off"}


def test_a_part_that_overruns_is_stopped_and_keeps_what_it_printed(tmp_path):
    from bench import gpu

    script = (f"import time; print({gpu.MARK!r} + '{{\"job\": \"warmup\"}}', flush=True); "
              "print('a library line', flush=True); time.sleep(60)")
    rows, status = gpu.run_part([sys.executable, "-c", script], 3, tmp_path / "part.log", _python_env())
    assert rows == [{"job": "warmup"}]
    assert status == "timed out after 3s and was stopped"


def test_a_failing_part_reports_its_last_line(tmp_path):
    from bench import gpu

    rows, status = gpu.run_part([sys.executable, "-c", "import sys; sys.exit('worker job padded failed: boom')"],
                                30, tmp_path / "part.log", _python_env())
    assert rows == []
    assert status.startswith("failed (exit 1): worker job padded failed: boom")
