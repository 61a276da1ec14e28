"""Linear-attention kernels: which ones really run, and padding-free batches only where they keep examples apart.

transformers binds Qwen3-Next's gated delta rule and causal conv1d to flash-linear-attention and
causal-conv1d when they import, else to its torch reference code (docs/linear-attention-padding-free.md).
Neither package exists on this CPU machine: the binding is read from transformers' own wrapper (checked
here with transformers' decorator and a stand-in package), the choice is tested with the binding
monkeypatched, and the GPU test compares padding-free with padded losses where the fused kernels exist.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import training.kernels as kernels
from config.job import TrainingJob
from errors import InputError
from training.kernels import (
    FUSED,
    REFERENCE,
    UNKNOWN,
    bound_implementation,
    kernels_in_use,
)
from training.sft_config import plan_batching


def _hp(packing):
    return TrainingJob.from_payload({"dataset": "d.jsonl", "hyperparameters": {"packing": packing}}).hyperparameters


def _bind(monkeypatch, conv: str, delta: str) -> None:
    found = {"gated_delta_rule": (delta, "flash-linear-attention"), "causal_conv1d": (conv, "causal-conv1d")}
    monkeypatch.setattr(kernels, "linear_attention_kernels",
                        lambda model_type: found if model_type == "qwen3_next" else {})


@pytest.fixture(scope="module")
def qwen3_next_config():
    from demo.tiny_models import tiny_config

    return tiny_config("qwen3_next", 512)


def test_the_binding_is_read_from_transformers_wrapper(monkeypatch):
    from transformers.integrations.hub_kernels import (
        use_kernel_func_from_hub_with_fallback,
    )
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling

    reference = modeling.causal_conv1d_fn.__wrapped__
    assert bound_implementation(use_kernel_func_from_hub_with_fallback("causal_conv1d_fn", "causal_conv1d")(
        reference)) == REFERENCE  # no causal-conv1d here
    received = {}
    fake = types.ModuleType("causal_conv1d")
    fake.causal_conv1d_fn = lambda x, weight, bias=None, seq_idx=None, activation=None: received.update(
        seq_idx=seq_idx) or x
    monkeypatch.setitem(sys.modules, "causal_conv1d", fake)
    fused = use_kernel_func_from_hub_with_fallback("causal_conv1d_fn", "causal_conv1d")(reference)
    assert bound_implementation(fused) == FUSED
    # the wrapper hands a fused kernel the boundaries it declares (seq_idx) and drops the rest
    fused(torch.zeros(1, 4, 6), torch.zeros(4, 3), None, activation="silu", seq_idx="ids", cu_seq_lens_q="x")
    assert received == {"seq_idx": "ids"}
    assert bound_implementation(len) == UNKNOWN and bound_implementation(lambda: 0) == UNKNOWN
    # as installed here: both Qwen3-Next operations on the torch reference
    assert kernels.linear_attention_kernels("qwen3_next") == {
        "gated_delta_rule": (REFERENCE, "flash-linear-attention"), "causal_conv1d": (REFERENCE, "causal-conv1d")}
    assert kernels.linear_attention_kernels("llama") == {}


def test_transformers_passes_the_collator_s_boundaries_to_both_operations(model_factory, monkeypatch):
    """The evidence behind padding-free Qwen3-Next, run: TRL's padding-free batch through the real model."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(model_factory("qwen3_next"), dtype=torch.float32).eval()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": [5, 17, 42, 9, 33]}, {"input_ids": [8, 21, 7]}, {"input_ids": [11, 12, 13, 14]}])
    assert {"seq_idx", "cu_seq_lens_q"} <= set(batch)
    with torch.no_grad(), pytest.raises(ValueError, match="can't keep packed sequences apart"):
        model(**batch, use_cache=False)  # the torch reference refuses the boundaries: never silent

    conv_reference = modeling.causal_conv1d_fn.__wrapped__
    delta_reference = modeling.torch_chunk_gated_delta_rule.__wrapped__
    seen = {"conv": [], "delta": []}

    def conv(x, weight, bias=None, activation=None, **kwargs):
        seen["conv"].append(kwargs.get("seq_idx"))
        return conv_reference(x, weight, bias, activation=activation)

    def delta(query, key, value, g, beta, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, **kwargs):
        seen["delta"].append(kwargs.get("cu_seqlens"))
        return delta_reference(query, key, value, g=g, beta=beta, initial_state=initial_state,
                               output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    monkeypatch.setattr(modeling, "causal_conv1d_fn", conv)
    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", delta)
    with torch.no_grad():
        model(**batch, use_cache=False)
    linear_layers = model.config.layer_types.count("linear_attention")
    assert len(seen["conv"]) == len(seen["delta"]) == linear_layers
    for seq_idx, cu_seqlens in zip(seen["conv"], seen["delta"]):
        assert torch.equal(seq_idx, batch["seq_idx"]) and torch.equal(cu_seqlens, batch["cu_seq_lens_q"])


def test_qwen3_next_is_padding_free_only_on_fused_kernels(monkeypatch, qwen3_next_config, model_factory):
    from transformers import AutoConfig

    llama = AutoConfig.from_pretrained(model_factory("llama"))
    assert plan_batching(_hp("auto"), qwen3_next_config) == "padded"  # as installed: torch reference
    assert plan_batching(_hp("auto"), llama) == "padding_free"
    for conv, delta, expected in ((FUSED, FUSED, "padding_free"), (FUSED, REFERENCE, "padded"),
                                  (REFERENCE, FUSED, "padded"), (UNKNOWN, FUSED, "padded")):
        _bind(monkeypatch, conv, delta)
        assert plan_batching(_hp("auto"), qwen3_next_config) == expected, (conv, delta)
        assert plan_batching(_hp(False), qwen3_next_config) == "padded"
        with pytest.raises(InputError, match="hyperparameters.packing true is not supported for qwen3_next"):
            plan_batching(_hp(True), qwen3_next_config)


def test_the_output_names_the_linear_attention_kernels_that_ran(monkeypatch, qwen3_next_config):
    model = types.SimpleNamespace(config=qwen3_next_config)
    usable = {"flash-linear-attention": "0.6.0", "causal-conv1d": "1.5.2", "liger-kernel": "0.7.0"}
    # importable on CUDA is not enough: transformers bound its torch reference here
    assert kernels_in_use(model, usable) == {"linear_attention": "torch reference"}
    _bind(monkeypatch, FUSED, FUSED)
    assert kernels_in_use(model, usable) == {"flash-linear-attention": "0.6.0", "causal-conv1d": "1.5.2",
                                             "linear_attention": "fused"}
    _bind(monkeypatch, REFERENCE, FUSED)
    assert kernels_in_use(model, usable) == {
        "flash-linear-attention": "0.6.0",
        "linear_attention": "causal_conv1d: torch reference, gated_delta_rule: fused"}
    llama = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama", _attn_implementation="sdpa"))
    assert kernels_in_use(llama, usable) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here")
def test_padding_free_qwen3_next_gives_the_padded_loss_on_fused_kernels(model_factory):
    """TRL's padding-free batch against its padded one, on flash-linear-attention and causal-conv1d.

    A control run drops the boundaries (position ids only): the linear-attention state then flows from
    one example into the next. On a CPU in fp32 that moves the logits by up to 1.15 (of 7.6) but the
    loss by only 0.0007 on this tiny model, so the logits are what tells a leak.
    """
    from transformers import AutoModelForCausalLM

    if not kernels.keeps_sequence_boundaries("qwen3_next"):
        pytest.skip(f"flash-linear-attention and causal-conv1d are not both bound here: "
                    f"{kernels.linear_attention_kernels('qwen3_next')}")
    collator = pytest.importorskip("trl.trainer.sft_trainer").DataCollatorForLanguageModeling
    model = AutoModelForCausalLM.from_pretrained(model_factory("qwen3_next"), dtype=torch.bfloat16).cuda().eval()
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist()}
                for n in (5, 70, 33, 9, 130)]  # across fla's chunks of 64
    padded = collator(pad_token_id=0)(examples)
    flat = collator(pad_token_id=0, padding_free=True)(examples)
    leaky = {k: flat[k] for k in ("input_ids", "labels", "position_ids")}
    on_gpu = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    with torch.no_grad():
        rows = model(**on_gpu(padded), use_cache=False)
        one_row = model(**on_gpu(flat), use_cache=False)
        leaked = model(**on_gpu(leaky), use_cache=False)
    alone = torch.cat([rows.logits[i, :len(e["input_ids"])] for i, e in enumerate(examples)])[None].float()
    kept, mixed = (alone - one_row.logits.float()).abs().max(), (alone - leaked.logits.float()).abs().max()
    print(f"qwen3_next loss padded {float(rows.loss):.5f} padding-free {float(one_row.loss):.5f}; "
          f"max logit difference {float(kept):.4f}, without boundaries {float(mixed):.4f}")
    assert abs(float(rows.loss) - float(one_row.loss)) < 0.015  # bf16
    assert kept < 0.15 and mixed > 0.5, (float(kept), float(mixed))
