"""Issue 13, finding 11 (the job schema's part): values of the wrong JSON type are refused, never coerced."""

from __future__ import annotations

import pytest

import handler
from tests.conftest import small_job

CASES = [
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size", "a whole number"),
    ({"hyperparameters": {"epochs": "3"}}, "hyperparameters.epochs", "a number"),
    ({"hyperparameters": {"lora_r": 8.0}}, "hyperparameters.lora_r", "a whole number"),
    ({"hyperparameters": {"learning_rate": "2e-4"}}, "hyperparameters.learning_rate", "a number"),
    ({"hyperparameters": {"packing": 1}}, "hyperparameters.packing", None),
    ({"hyperparameters": {"train_on_inputs": "false"}}, "hyperparameters.train_on_inputs", "true or false"),
    ({"dataset": {"uri": "datasets/capitals.jsonl", "max_examples": "32"}}, "dataset.max_examples", "a whole number"),
]


@pytest.mark.parametrize("overrides, field, words", CASES)
def test_wrong_types_are_refused_naming_the_field(volume, overrides, field, words):
    output = handler.handler({"id": "t", "input": small_job(job_id="types", action="validate", **overrides)})
    assert output.get("error", "").startswith("input: "), output
    assert field in output["error"], output
    if words:
        assert words in output["error"], output


def test_numbers_of_the_right_kind_still_pass(volume):
    output = handler.handler({"id": "t", "input": small_job(
        job_id="types", action="validate", hyperparameters={"epochs": 1, "learning_rate": 1e-3, "lora_alpha": 16})})
    assert output.get("status") == "valid", output
