"""The job input schema (CONTRACT §1): valid inputs parse, invalid ones say what and how to fix."""

from __future__ import annotations

import pytest

from config.job import DatasetSpec, Hyperparameters, OutputSpec, TrainingJob, job_json_schema
from errors import InputError

DATA = {"uri": "datasets/x.jsonl"}

VALID = [
    ("minimal", {"dataset": "datasets/x.jsonl"}, {"action": "train"}),
    ("dataset string is its uri", {"dataset": "https://example.com/a.jsonl"},
     {"dataset.uri": "https://example.com/a.jsonl"}),
    ("dataset_url alias", {"dataset_url": "datasets/x.jsonl"}, {"dataset.uri": "datasets/x.jsonl"}),
    ("inline records", {"dataset": {"records": [{"prompt": "a", "completion": "b"}]}},
     {"dataset.format": "auto"}),
    ("base_model top level", {"base_model": "Qwen/Qwen3-Next-80B-A3B-Instruct", "dataset": DATA},
     {"base_model": "Qwen/Qwen3-Next-80B-A3B-Instruct"}),
    ("base_model in hyperparameters (the Edge Function)",
     {"hyperparameters": {"base_model": "mistralai/Mistral-7B-v0.1"}, "dataset": DATA},
     {"base_model": "mistralai/Mistral-7B-v0.1"}),
    ("same base_model twice", {"base_model": "org/m", "hyperparameters": {"base_model": "org/m"},
                               "dataset": DATA}, {"base_model": "org/m"}),
    ("absolute volume path", {"base_model": "/runpod-volume/models/qwen", "dataset": DATA},
     {"base_model": "/runpod-volume/models/qwen"}),
    ("contract example", {
        "action": "train", "job_id": "0b6f-aa.1", "base_model": "Qwen/Qwen3-Next-80B-A3B-Instruct",
        "model_revision": "main",
        "dataset": {"uri": "https://x/train.jsonl", "format": "auto", "eval_fraction": 0.05},
        "hyperparameters": {"epochs": 3, "learning_rate": 2e-4, "batch_size": 4,
                            "gradient_accumulation_steps": 4, "max_seq_length": 2048, "lora_r": 16,
                            "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "auto",
                            "quantization": "auto", "seed": 42},
        "output": {"prefix": "adapters/team-a"}, "metadata": {"user_id": "u1"}},
     {"job_id": "0b6f-aa.1", "output.prefix": "adapters/team-a"}),
    ("explicit target modules", {"dataset": DATA, "hyperparameters": {"target_modules": ["q_proj", "v_proj"]}},
     {"hyperparameters.target_modules": ["q_proj", "v_proj"]}),
    ("prefetch needs no dataset", {"action": "prefetch", "base_model": "org/m"}, {"action": "prefetch"}),
    ("prefix slashes trimmed", {"dataset": DATA, "output": {"prefix": "/a/b/"}}, {"output.prefix": "a/b"}),
]


@pytest.mark.parametrize("name,payload,expected", VALID, ids=[c[0] for c in VALID])
def test_valid_inputs(name, payload, expected):
    job = TrainingJob.from_payload(payload)
    for dotted, value in expected.items():
        obj = job
        for part in dotted.split("."):
            obj = getattr(obj, part)
        assert obj == value


INVALID = [
    ("unknown top-level key names the closest", {"datset": DATA}, ["unknown key 'datset'", "did you mean 'dataset'"]),
    ("unknown hyperparameter names the closest", {"dataset": DATA, "hyperparameters": {"lora_rank": 8}},
     ["hyperparameters", "unknown key 'lora_rank'", "did you mean 'lora_r'"]),
    ("unknown key without a close one lists the valid keys", {"dataset": DATA, "output": {"zzz": 1}},
     ["unknown key 'zzz'", "valid keys: prefix"]),
    ("rank too large", {"dataset": DATA, "hyperparameters": {"lora_r": 5000}},
     ["hyperparameters.lora_r", "less than or equal to 1024", "got 5000"]),
    ("rank zero", {"dataset": DATA, "hyperparameters": {"lora_r": 0}},
     ["hyperparameters.lora_r", "greater than or equal to 1", "got 0"]),
    ("dropout 1.5", {"dataset": DATA, "hyperparameters": {"lora_dropout": 1.5}},
     ["hyperparameters.lora_dropout", "less than 1", "got 1.5"]),
    ("learning rate negative", {"dataset": DATA, "hyperparameters": {"learning_rate": -1}},
     ["hyperparameters.learning_rate", "greater than 0"]),
    ("sequence length too short", {"dataset": DATA, "hyperparameters": {"max_seq_length": 8}},
     ["hyperparameters.max_seq_length", "greater than or equal to 16"]),
    ("quantization unknown", {"dataset": DATA, "hyperparameters": {"quantization": "3bit"}},
     ["hyperparameters.quantization", "'auto', 'none', '8bit' or '4bit'", "got '3bit'"]),
    ("target_modules bad string", {"dataset": DATA, "hyperparameters": {"target_modules": "q"}},
     ["hyperparameters.target_modules", "'auto' or 'all-linear'"]),
    ("lm_head not adaptable", {"dataset": DATA, "hyperparameters": {"target_modules": ["lm_head"]}},
     ["lm_head"]),
    ("two different base models", {"base_model": "a/b", "hyperparameters": {"base_model": "c/d"}, "dataset": DATA},
     ["'base_model' is 'a/b'", "'hyperparameters.base_model' is 'c/d'"]),
    ("path traversal in base_model", {"base_model": "../../etc", "dataset": DATA}, ["base_model", "'../../etc'"]),
    ("traversal in absolute base_model", {"base_model": "/runpod-volume/models/../../etc", "dataset": DATA},
     ["may not contain '..'"]),
    ("train without dataset", {"base_model": "a/b"}, ["action 'train' needs a 'dataset'"]),
    ("both uri and records", {"dataset": {"uri": "a", "records": [{"text": "x"}]}}, ["exactly one of 'uri'"]),
    ("neither uri nor records", {"dataset": {"format": "chat"}}, ["exactly one of 'uri'"]),
    ("eval_fraction too large", {"dataset": {"uri": "a", "eval_fraction": 0.9}},
     ["dataset.eval_fraction", "less than or equal to 0.5"]),
    ("bad job_id", {"job_id": "has space", "dataset": DATA}, ["job_id", "should match pattern"]),
    ("bad action", {"action": "fly", "dataset": DATA}, ["action", "'train', 'prefetch', 'validate' or 'selftest'"]),
    ("prefix with dot-dot", {"dataset": DATA, "output": {"prefix": "a/../b"}}, ["output.prefix"]),
    ("dataset_url disagrees with dataset.uri", {"dataset": {"uri": "a"}, "dataset_url": "b"}, ["'dataset_url'"]),
    ("input not an object", ["x"], ["must be a JSON object"]),
    ("selftest brings its own model", {"action": "selftest", "base_model": "a/b"}, ["action 'selftest' brings its own"]),
]


@pytest.mark.parametrize("name,payload,fragments", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_are_worded(name, payload, fragments):
    with pytest.raises(InputError) as info:
        TrainingJob.from_payload(payload)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_job_id_defaults_to_runpod_id():
    assert TrainingJob.from_payload({"dataset": DATA}, default_job_id="abc-123").job_id == "abc-123"
    assert TrainingJob.from_payload({"dataset": DATA, "job_id": "mine"}, default_job_id="x").job_id == "mine"


def test_defaults_are_lora_sft_defaults():
    hp = TrainingJob.from_payload({"dataset": DATA}).hyperparameters
    assert (hp.learning_rate, hp.lora_r, hp.lora_alpha, hp.lora_dropout) == (2e-4, 16, 32, 0.05)
    assert hp.target_modules == "auto" and hp.quantization == "auto" and not hp.train_on_inputs


def test_schema_is_json_schema():
    schema = job_json_schema()
    assert schema["type"] == "object"
    assert {"base_model", "dataset", "hyperparameters", "action"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("model", [TrainingJob, DatasetSpec, Hyperparameters, OutputSpec],
                         ids=lambda m: m.__name__)
def test_every_job_field_says_what_it_means(model):
    undocumented = [name for name, field in model.model_fields.items()
                    if not (field.description or "").strip()]
    assert not undocumented, f"{model.__name__} fields without Field(description=…): {undocumented}"


def test_cli_schema_shows_the_descriptions(capsys):
    import json

    import cli

    assert cli.main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    lora_r = schema["$defs"]["Hyperparameters"]["properties"]["lora_r"]
    assert "rank" in lora_r["description"] and lora_r["default"] == 16
    assert "idempotency key" in schema["properties"]["job_id"]["description"]

    assert cli.main(["schema", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| name | default | bounds / values | meaning |")
    assert "| `lora_r` | 16 | 1 … 1,024 | LoRA rank" in table
    assert "| `lora_dropout` | 0.05 | [0, 1) |" in table
