"""Every family the worker serves trains on a CPU: loss falls, only LoRA moves, the adapter reloads.

Tiny models built from configs (demo/tiny_models.py) of Llama, Mistral, Qwen2, Qwen3 and Qwen3-Next
(hybrid linear/full attention with fused routed experts and a shared expert).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainerCallback

from config.job import TrainingJob
from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
from demo.tiny_models import FAMILIES
from errors import InputError
from tests.conftest import assert_adapter_reloads_identically, small_job
from train_lora import train_lora
from training.request import TrainRequest
from training.runtime import plan_runtime
from training.sft_config import plan_batching
from training.targets import Targets, lora_dropout_for, resolve_targets


class Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}


def train_family(settings, model_dir, tmp_path, **overrides):
    job = TrainingJob.from_payload(small_job(**overrides))
    hp = job.hyperparameters
    tokenizer = load_tokenizer(model_dir)
    raw = read_dataset(job.dataset, settings, seed=hp.seed)
    data = tokenize_dataset(raw, tokenizer, max_seq_length=hp.max_seq_length, train_on_inputs=False)
    snapshot = Snapshot()
    request = TrainRequest(model_path=model_dir, hyperparameters=hp, output_dir=tmp_path / "job",
                           checkpoint_dir=tmp_path / "ckpt", base_model_id=f"org/{model_dir.name}",
                           runtime=plan_runtime(hp))
    result = train_lora(request, data, tokenizer=tokenizer, callbacks=[snapshot])
    return result, snapshot, tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_only_lora_and_reloads(family, model_factory, settings, tmp_path):
    model_dir = model_factory(family)
    result, snapshot, tokenizer = train_family(settings, model_dir, tmp_path,
                                               hyperparameters={"epochs": 3})
    model = result.model
    metrics = result.metrics
    assert metrics["steps"] == 12 and metrics["resumed_from_step"] == 0
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    # The capitals data is learnable: the loss falls well below where it started.
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora
    for name, param in model.named_parameters():
        if name in lora:
            assert not torch.equal(param.detach(), snapshot.before[name]), f"LoRA weight {name} did not move"
        else:
            assert not param.requires_grad, name
            assert torch.equal(param.detach(), snapshot.before[name]), f"base weight {name} changed"

    assert_adapter_reloads_identically(model, model_dir, result.adapter_dir, tokenizer)


def test_qwen3_next_adapter_covers_attention_linear_attention_and_experts_not_routers(
        model_factory, settings, tmp_path):
    model_dir = model_factory("qwen3_next")
    result, _, _ = train_family(settings, model_dir, tmp_path, hyperparameters={"max_steps": 2})
    assert result.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    # no flash-linear-attention / causal-conv1d here: transformers ran its torch reference, and says so
    assert result.kernels == {"linear_attention": "torch reference"}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "out_proj"} <= set(result.target_modules)
    assert "shared_expert_gate" not in result.target_modules
    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    def touched(fragment):
        return [k for k in keys if fragment in k]
    assert touched("self_attn.q_proj.lora_A") and touched("self_attn.o_proj.lora_B")
    assert touched("linear_attn.in_proj_qkvz.lora_A") and touched("linear_attn.out_proj.lora_B")
    assert touched("mlp.experts.lora_A") and touched("mlp.experts.base_layer.lora_A"), keys
    # peft 0.21 would map 'gate_proj'/'up_proj'/'down_proj' onto the fused experts for this layout: the
    # shared expert's Linear layers are named by path and kept from that remap (training/peft_setup.py).
    assert touched("mlp.shared_expert.gate_proj.lora_A") and touched("mlp.shared_expert.down_proj.lora_B")
    assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
            "mlp.shared_expert.down_proj"} <= set(result.target_modules)
    assert not {"gate_proj", "up_proj", "down_proj"} & set(result.target_modules)
    assert not touched("mlp.gate.") and not touched("shared_expert_gate"), "a router was adapted"
    assert not touched("lm_head") and not touched("embed_tokens")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(result.target_parameters) <= set(config["target_parameters"])
    assert not {"gate", "shared_expert_gate"} & set(config["target_modules"])
    # The expert LoRA has one rank-r block per expert: shape (r * experts, in).
    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        a = fh.get_tensor(next(k for k in keys if k.endswith("mlp.experts.lora_A.weight")))
    assert a.shape[0] == 8 * 4  # lora_r 8 × 4 experts


def test_explicit_targets_name_expert_weights_and_list_them_when_wrong(model_factory):
    moe = AutoModelForCausalLM.from_pretrained(model_factory("qwen3_next"))
    assert resolve_targets(moe, ["q_proj", "gate_up_proj"]) == Targets(["q_proj"], ["mlp.experts.gate_up_proj"])
    assert resolve_targets(moe, "all-linear").parameters == []
    with pytest.raises(InputError) as info:
        resolve_targets(moe, ["w1"])
    message = str(info.value)
    assert "['w1']" in message and "in_proj_qkvz" in message and "mlp.experts.gate_up_proj" in message


def test_default_dropout_gives_way_on_fused_experts_but_an_explicit_one_is_an_error():
    experts = Targets(["q_proj"], ["mlp.experts.gate_up_proj"])
    default = TrainingJob.from_payload({"dataset": "d.jsonl"}).hyperparameters
    assert default.lora_dropout == 0.05 and lora_dropout_for(default, experts) == 0.0
    assert lora_dropout_for(default, Targets(["q_proj"])) == 0.05
    explicit = TrainingJob.from_payload({"dataset": "d.jsonl",
                                         "hyperparameters": {"lora_dropout": 0.1}}).hyperparameters
    with pytest.raises(InputError, match="lora_dropout must be 0 when fused expert weights"):
        lora_dropout_for(explicit, experts)


def test_batching_is_unpadded_only_where_examples_cannot_leak(model_factory):
    from transformers import AutoConfig

    llama = AutoConfig.from_pretrained(model_factory("llama"))
    hybrid = AutoConfig.from_pretrained(model_factory("qwen3_next"))
    hp = lambda packing: TrainingJob.from_payload(  # noqa: E731
        {"dataset": "d.jsonl", "hyperparameters": {"packing": packing}}).hyperparameters
    assert plan_batching(hp("auto"), llama) == "padding_free"
    assert plan_batching(hp(True), llama) == "packed"
    assert plan_batching(hp(False), llama) == "padded"
    assert plan_batching(hp("auto"), hybrid) == "padded"
    with pytest.raises(InputError, match="linear-attention layers"):
        plan_batching(hp(True), hybrid)


def test_padding_free_rows_do_not_attend_across_examples(tiny_llama):
    """Two examples flattened into one row, positions restarting, no mask: the same logits as alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    a, b = torch.tensor([[5, 17, 42, 9, 33]]), torch.tensor([[8, 21, 7]])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
        # As in training (load_base_model turns the cache off): a cache disables packed-row detection.
        flat = model(input_ids=torch.cat([a, b], dim=1), use_cache=False,
                     position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])).logits
        masked = model(input_ids=torch.cat([a, b], dim=1), attention_mask=torch.ones(1, 8, dtype=torch.long)).logits
    torch.testing.assert_close(flat, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(masked[:, 5:], alone[:, 5:], atol=1e-3), "the check cannot tell a leak"


def test_non_finite_loss_stops_with_a_train_error(settings, tmp_path, model_factory):
    """A model whose logits overflow float32 (its output head is infinite): the loss is
    NaN from the first step, and the job stops with a `train:` error instead of training on."""
    from errors import TrainingError

    broken = model_factory("llama", head_scale=float("inf"))
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf) at step \d+; lower learning_rate"):
        train_family(settings, broken, tmp_path, hyperparameters={"max_steps": 4})
    assert not any((tmp_path / "ckpt").glob("checkpoint-*/checkpoint-complete.json")), \
        "a checkpoint of broken weights was kept"
