"""The arithmetic behind the GPU section's MFU: parameter counts, LoRA training FLOPs, card peaks.

No torch here: the numbers are checked by hand in tests/test_bench_gpu.py.

FLOPs of one LoRA training pass over examples of lengths s_1 … s_n (T = Σ s_i real tokens):

    4 · N_frozen · T  +  6 · N_lora · T  +  12 · L · d_attn · Σ s_i²

- N_frozen: the base's weights that multiply activations — every projection of every layer and the
  LM head; not the input embedding (a lookup) nor the norms (elementwise). Forward 2 FLOPs per weight
  per token, backward 2 more for the gradient of the activations; none for a frozen weight's gradient.
- N_lora: the adapter's weights, trained: forward 2, backward 4 (activations and weights), as in the
  usual 6·N of full training.
- Attention (PaLM, Chowdhery et al. 2022, appendix B): per layer and token, QKᵀ and AV take
  2 · d_attn · s FLOPs each forward (d_attn = heads × head_dim, the query width), backward twice
  that: 12 · L · d_attn · s per token, so 12 · L · d_attn · s² per example. Counted over the full
  s × s square as PaLM does (not halved for the causal mask), per example (padding-free attends
  within each example; a padded batch's pad positions are not counted).
- Pad tokens are never counted: MFU is useful work per second, so padding shows up as lower MFU.
- Gradient checkpointing would recompute the forward (+2·N·T); the bench runs without it, and MFU
  never counts recomputation.

MFU = FLOPs ÷ (training seconds × the card's dense bf16 tensor peak).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMULA = ("4·N_frozen·T + 6·N_lora·T + 12·L·d_attn·Σ s_i² (N_frozen: projections and LM head, "
           "not the input embedding; T: real tokens; s_i: each example's length; PaLM's attention count, "
           "not halved for the causal mask; no recomputation)")

# Llama-3-8B's published shape (meta-llama/Meta-Llama-3-8B config.json): the GPU section's model.
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


@dataclass(frozen=True)
class LlamaCounts:
    total: int  # every parameter of the base
    frozen_matmul: int  # projections and LM head: N_frozen
    embedding: int
    lora: int  # rank-r adapters on all seven projections of every layer: N_lora
    layers: int
    attention_width: int  # heads × head_dim: d_attn


def llama_counts(config: dict, lora_r: int) -> LlamaCounts:
    """Parameter counts of a Llama config (a dict of its fields), with LoRA of rank ``lora_r`` on every projection."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    # (in, out) of q, k, v, o, gate, up, down: every projection, each adapted (bench/run.py's TARGETS)
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    per_layer = sum(i * o for i, o in shapes)
    head = h * vocab
    embedding = h * vocab
    norms = layers * 2 * h + h
    tied = config.get("tie_word_embeddings", False)
    return LlamaCounts(
        total=layers * per_layer + embedding + (0 if tied else head) + norms,
        frozen_matmul=layers * per_layer + head,
        embedding=embedding,
        lora=layers * lora_r * sum(i + o for i, o in shapes),
        layers=layers,
        attention_width=q,
    )


def lora_training_flops(counts: LlamaCounts, lengths: list[int]) -> float:
    """FLOPs of one LoRA training pass (forward and backward) over examples of these real lengths."""
    tokens = sum(lengths)
    squares = sum(s * s for s in lengths)
    return (4 * counts.frozen_matmul * tokens + 6 * counts.lora * tokens
            + 12 * counts.layers * counts.attention_width * squares)


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOPS, by a pattern on the device name
# (torch.cuda.get_device_name / nvidia-smi). First match wins: the specific names come first.
# Datasheets quote the sparse figure first; the dense one is half of it.
PEAKS: list[tuple[str, str, float, str]] = [
    # GH200 (NVIDIA GH200 datasheet: 1,979 TFLOPS sparse): the H100 SXM's GPU; first, as 'H200' matches its name
    (r"GH200", "GH200", 989.4, "NVIDIA GH200 Grace Hopper datasheet: 1,979 TFLOPS bf16 with sparsity, halved"),
    (r"H200 NVL", "H200 NVL", 835.5, "NVIDIA H200 datasheet: H200 NVL 1,671 TFLOPS bf16 with sparsity, halved"),
    (r"H200", "H200 SXM", 989.4, "NVIDIA H200 datasheet: H200 SXM 1,979 TFLOPS bf16 with sparsity, halved"),
    # NVIDIA H100 datasheet: SXM 1,979 / PCIe 1,513 / NVL 1,671 TFLOPS bf16 with sparsity
    (r"H100 NVL", "H100 NVL", 835.5, "NVIDIA H100 datasheet: H100 NVL 1,671 TFLOPS bf16 with sparsity, halved"),
    (r"H100 PCIe", "H100 PCIe", 756.5, "NVIDIA H100 datasheet: H100 PCIe 1,513 TFLOPS bf16 with sparsity, halved"),
    (r"H100", "H100 SXM", 989.4, "NVIDIA H100 datasheet: H100 SXM 1,979 TFLOPS bf16 with sparsity, halved "
                                 "(the SXM card reports itself as 'H100 80GB HBM3')"),
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity), SXM and PCIe alike
    (r"A100", "A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    # NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity)
    (r"L40S", "L40S", 362.05, "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    # NVIDIA L40 datasheet: BF16 Tensor Core 181.05 TFLOPS dense (362.1 with sparsity)
    (r"L40\b", "L40", 181.05, "NVIDIA L40 datasheet: BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)"),
    # NVIDIA Ampere GA102 whitepaper, appendix (RTX A6000): peak BF16 tensor with FP32 accumulate 154.8 (309.7 sparse)
    (r"RTX A6000", "RTX A6000", 154.8, "NVIDIA Ampere GA102 whitepaper: RTX A6000 BF16 tensor 154.8 TFLOPS "
                                       "(309.7 with sparsity)"),
    # NVIDIA A40 datasheet: BF16 Tensor Core with FP32 accumulate 149.7 TFLOPS (299.4 with sparsity)
    (r"\bA40\b", "A40", 149.7, "NVIDIA A40 datasheet: BF16 Tensor 149.7 TFLOPS (299.4 with sparsity)"),
    # NVIDIA Ada Lovelace whitepaper, appendix: RTX 6000 Ada BF16 tensor with FP32 accumulate 364.2 (728.5 sparse)
    (r"RTX 6000 Ada", "RTX 6000 Ada", 364.2, "NVIDIA Ada Lovelace whitepaper: RTX 6000 Ada BF16 tensor 364.2 "
                                             "TFLOPS (728.5 with sparsity)"),
    # NVIDIA Ada Lovelace whitepaper, appendix A: GeForce RTX 4090 peak BF16 tensor with FP32 accumulate
    # 165.2 TFLOPS (330.3 with sparsity): GeForce cards run FP32 accumulation at half rate. Not the 4090 D.
    (r"RTX 4090(?! D)", "RTX 4090", 165.2, "NVIDIA Ada Lovelace whitepaper: GeForce RTX 4090 BF16 tensor with "
                                           "FP32 accumulate 165.2 TFLOPS (330.3 with sparsity)"),
    # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
    (r"\bL4\b", "L4", 121.0, "NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity, halved"),
]


@dataclass(frozen=True)
class Peak:
    card: str
    tflops: float
    source: str


def peak_for(device_name: str | None) -> Peak | None:
    """The dense bf16 peak of the card with this name, or None when it is not in the table."""
    if not device_name:
        return None
    for pattern, card, tflops, source in PEAKS:
        if re.search(pattern, device_name):
            return Peak(card, tflops, source)
    return None


def mfu(flops: float, seconds: float, peak: Peak | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOPs per second ÷ the peak; None without a peak or a time."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak.tflops * 1e12)


def peak_or_reason(device: str, device_name: str | None) -> tuple[Peak | None, str | None]:
    """The peak to set MFU against, or why MFU is null (a CPU; a card missing from the table)."""
    if device != "cuda":
        return None, f"MFU is set against a GPU's bf16 tensor peak; this run is on {device}"
    peak = peak_for(device_name)
    if peak is None:
        return None, (f"card {device_name!r} is not in bench/gpu_flops.py's PEAKS; add its dense bf16 "
                      "TFLOPS with the datasheet as source")
    return peak, None
