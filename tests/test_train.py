"""train_lora: LoRA moves, the base does not, and the saved adapter reproduces the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from config.job import TrainingJob
from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
from errors import InputError
from tests.conftest import assert_adapter_reloads_identically, small_job
from train_lora import train_lora
from training.memory_plan import plan_memory
from training.request import TrainRequest
from training.runtime import choose_precision, plan_runtime
from training.targets import EXCLUDED_MODULES, resolve_targets


class Snapshot(TrainerCallback):
    """Every parameter as it was just before the first optimizer step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}


def _train(settings, model_dir, tmp_path, **overrides):
    job = TrainingJob.from_payload(small_job(**overrides))
    tokenizer = load_tokenizer(model_dir)
    raw = read_dataset(job.dataset, settings, seed=job.hyperparameters.seed)
    data = tokenize_dataset(raw, tokenizer, max_seq_length=job.hyperparameters.max_seq_length,
                            train_on_inputs=False)
    snapshot = Snapshot()
    request = TrainRequest(model_path=model_dir, hyperparameters=job.hyperparameters, output_dir=tmp_path / "job",
                           checkpoint_dir=tmp_path / "ckpt", base_model_id="org/tiny-llama",
                           base_revision="abc123", runtime=plan_runtime(job.hyperparameters))
    result = train_lora(request, data, tokenizer=tokenizer, callbacks=[snapshot])
    return result, snapshot, tokenizer


def test_training_moves_lora_weights_only_and_reloads_identically(settings, tmp_path):
    model_dir = settings.models_root / "tiny-llama"
    result, snapshot, tokenizer = _train(settings, model_dir, tmp_path)
    model = result.model

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and base
    for name, param in lora.items():
        assert param.requires_grad
        assert not torch.equal(param.detach(), snapshot.before[name]), f"LoRA weight {name} did not move"
    for name, param in base.items():
        assert not param.requires_grad
        assert torch.equal(param.detach(), snapshot.before[name]), f"base weight {name} changed"
    # ... and the base weights are still the ones on disk.
    pristine = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, param in model.get_base_model().state_dict().items():
        if "lora_" not in name and ".base_layer." not in name:
            assert torch.equal(param, pristine[name]), name

    assert result.metrics["steps"] == 8  # 32 examples / batch 8 * 2 epochs
    events = list((tmp_path / "job" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)  # TensorBoard next to metrics.json
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tmp_path / "job" / "tensorboard")).Reload().Tags()["scalars"]
    assert "train/loss" in scalars and "train/learning_rate" in scalars
    assert result.metrics["last_loss"] < result.metrics["first_loss"]
    assert result.metrics["train_tokens"] > 0

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"  # the canonical id, not a path
    assert config["revision"] == "abc123"
    assert sorted(config["target_modules"]) == sorted(result.target_modules)

    assert_adapter_reloads_identically(model, model_dir, result.adapter_dir, tokenizer)


def test_auto_targets_are_projections_not_heads_or_routers(tiny_llama, model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert resolve_targets(model, "auto").modules == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    moe = AutoModelForCausalLM.from_pretrained(model_factory("qwen3_next"))
    chosen = resolve_targets(moe, "auto").modules
    assert not set(chosen) & EXCLUDED_MODULES
    assert {"q_proj", "o_proj", "out_proj"} <= set(chosen)


def test_explicit_targets_that_match_nothing_list_what_exists(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(InputError) as info:
        resolve_targets(model, ["q_proj", "query_key_value"])
    assert "['query_key_value']" in str(info.value) and "q_proj" in str(info.value)


def test_quantization_without_cuda_is_an_input_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    hp = TrainingJob.from_payload(small_job(hyperparameters={"quantization": "8bit"})).hyperparameters
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        plan_runtime(hp)
    runtime = plan_runtime(TrainingJob.from_payload(small_job()).hyperparameters)
    assert (runtime.device, runtime.precision, runtime.quantization) == ("cpu", "fp32", "none")
    assert runtime.gradient_checkpointing is False


def test_the_request_reaches_a_rank_as_it_was_built(tmp_path):
    hp = TrainingJob.from_payload(small_job(hyperparameters={"lora_r": 4})).hyperparameters
    request = TrainRequest(model_path=tmp_path / "m", hyperparameters=hp, output_dir=tmp_path / "job",
                           checkpoint_dir=tmp_path / "ckpt", base_model_id="org/tiny-llama",
                           runtime=plan_runtime(hp), distributed="ddp", max_train_seconds=30)
    back = TrainRequest.model_validate_json(request.model_dump_json())
    assert back == request
    # What the job set, and only that: lora_dropout_for tells a default from a user's choice by it.
    assert back.hyperparameters.model_fields_set == hp.model_fields_set
    ranked = back.for_rank(1, 1, 2)
    assert (ranked.rank, ranked.local_rank, ranked.world_size) == (1, 1, 2)
    assert ranked.hyperparameters.model_fields_set == hp.model_fields_set


@pytest.mark.parametrize("cuda, bf16, expected", [(True, True, "bf16"), (True, False, "fp16"),
                                                   (False, True, "fp32"), (False, False, "fp32")])
def test_one_precision_rule(cuda, bf16, expected):
    assert choose_precision(cuda, bf16) == expected


def test_the_memory_plan_and_the_runtime_agree(tiny_llama):
    hp = TrainingJob.from_payload(small_job()).hyperparameters
    plan = plan_memory(tiny_llama, hp)  # this machine, as the pipeline plans it
    runtime = plan_runtime(hp, plan)
    assert (plan.device, plan.precision, plan.quantization, plan.gradient_checkpointing) == (
        runtime.device, runtime.precision, runtime.quantization, runtime.gradient_checkpointing)
