"""Tiny, deterministic causal LMs built from configs, for the demo, the tests and the benchmarks.

No hub is involved: the tokenizer is a byte-level BPE trained here on a small corpus, the weights are
seeded random, and both are saved with ``save_pretrained`` so the worker's real loading path runs.
The same families the worker serves are available: Llama (the demo), Mistral, Qwen2, Qwen3 and
Qwen3-Next (hybrid linear/full attention with routed and shared experts).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen/Qwen3-Next-80B-A3B-Instruct's published config.json, the fields that set its size: the memory
# plan's tests, `cli.py plan` and the shape-twin bench build configs (never weights) from it.
QWEN3_NEXT_80B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    full_attention_interval=4,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_next", "qwen3_moe")

_BASE_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model learns what its data shows it.
user assistant system question answer capital country city river mountain language
Translate, summarise, explain, list, answer briefly. Yes. No. Thank you.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus equals
"""


def train_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )


def tiny_config(family: str, vocab_size: int, *, hidden_size: int = 64, layers: int = 2):
    """A config of the family, small enough to train on a CPU in seconds."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=hidden_size // 4)
    if family == "qwen3_next":
        layers = max(layers, 4)
        return transformers.Qwen3NextConfig(
            **{**common, "num_hidden_layers": layers},
            head_dim=hidden_size // 4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size // 2,
            shared_expert_intermediate_size=hidden_size // 2,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"]
            * (layers // 4),
        )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, head_dim=hidden_size // 4, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=hidden_size // 2, decoder_sparse_step=1, mlp_only_layers=[],
        )
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_tiny_model(
    out_dir: str | Path,
    *,
    family: str = "llama",
    corpus: list[str] | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 512,
    repo_id: str | None = None,
    head_scale: float = 10.0,
) -> Path:
    """Build and save a tiny model + tokenizer into ``out_dir`` (atomically: temp folder, rename)."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = train_tokenizer([_BASE_CORPUS, *(corpus or [])], vocab_size=vocab_size)
    config = tiny_config(family, len(tokenizer), hidden_size=hidden_size, layers=layers)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # LoRA never touches lm_head, and a frozen head at the usual init scale (std 0.02) cannot express
    # a confident prediction: the loss would stall near log(vocab). A larger head lets it learn.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if repo_id:
            # What `prefetch` writes for a downloaded model: the canonical id of this folder.
            (tmp / ".worker-model.json").write_text(json.dumps({"repo_id": repo_id}))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def chat_corpus(path: str | Path) -> list[str]:
    """The texts of a chat JSONL file, to train a tokenizer that knows the demo's words."""
    texts = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts
