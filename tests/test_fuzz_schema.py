"""A property test over the job schema: near-valid payloads, built from config/job.py's own models
and then mutated, each through ``handler.handler`` (``action: validate``, so no weights).

Every example must answer quickly with either a valid output (``status: valid`` with the contract's
keys) or ``{"error": "<stage>: …"}`` — never an exception, never a traceback, never an "unexpected"
error (a bug's mark), never a planted secret. Mutations touch the fields that are checked before any
file is read, so their errors are ``input:``; a value that is valid but leaves no usable example
(``max_seq_length: 1``) may be a ``dataset:`` error. The example count goes to build/reliability.json.
"""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handler
from config.job import DatasetSpec, Hyperparameters, OutputSpec, TrainingJob
from tests.conftest import small_job
from tests.reliability import count, plant_environment, scan

EXAMPLES = 100
SECONDS = 3.0

RECORDS = [{"prompt": f"Capital of country {i}?", "completion": f"City {i}."} for i in range(6)]

# Values of every JSON kind, with the edges that break parsers and bounds.
hostile = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300]),
    st.text(max_size=40), st.sampled_from(["", " ", "3", "1e3", "true", "auto", "all-linear", "\x00", "\u202e",
                                           "../../etc", "hf_" + "x" * 30]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _names(model) -> list[str]:
    return sorted(model.model_fields)


@st.composite
def near_valid_jobs(draw) -> dict:
    job = small_job(action="validate")
    job["dataset"] = {"records": RECORDS}
    kind = draw(st.sampled_from(["hyper", "hyper", "hyper", "dataset", "output", "top", "drop", "unknown"]))
    if kind == "hyper":
        for name in draw(st.lists(st.sampled_from(_names(Hyperparameters)), min_size=1, max_size=3, unique=True)):
            if name != "base_model":
                job["hyperparameters"][name] = draw(hostile)
    elif kind == "dataset":
        name = draw(st.sampled_from([n for n in _names(DatasetSpec) if n not in ("uri", "records", "eval_uri")]))
        job["dataset"][name] = draw(hostile)
    elif kind == "output":
        job["output"] = {draw(st.sampled_from(_names(OutputSpec))): draw(hostile)}
    elif kind == "top":
        name = draw(st.sampled_from([n for n in _names(TrainingJob) if n not in (
            "base_model", "dataset", "dataset_url", "init_adapter", "model_revision", "action")]))
        job[name] = draw(hostile)
    elif kind == "drop":
        job["hyperparameters"].pop(draw(st.sampled_from(sorted(job["hyperparameters"]))))
    else:
        where = draw(st.sampled_from(["top", "hyperparameters", "dataset"]))
        key = draw(st.text(min_size=1, max_size=12))
        target = job if where == "top" else job[where]
        if key not in target and not (where == "top" and key in TrainingJob.model_fields):
            target[key] = draw(hostile)
    return job


@pytest.fixture(scope="module")
def tally():
    figures = {"examples": 0, "valid": 0, "errors": 0, "max_seconds": 0.0, "secrets_leaked": 0}
    yield figures
    count("fuzz", **figures)


def test_every_near_valid_job_answers_cleanly(volume, monkeypatch, caplog, tally):
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    plant_environment(monkeypatch)
    handler.get_settings.cache_clear()
    caplog.set_level("INFO")

    @settings(max_examples=EXAMPLES, deadline=int(SECONDS * 1000), derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(job=near_valid_jobs())
    def check(job):
        started = time.monotonic()
        output = handler.handler({"id": "fuzz", "input": job})
        seconds = time.monotonic() - started
        tally["examples"] += 1
        tally["max_seconds"] = max(tally["max_seconds"], round(seconds, 3))
        text = json.dumps(output, default=str)
        leaks = scan({"output": text})
        tally["secrets_leaked"] += len(leaks)
        assert not leaks, leaks
        if "error" in output:
            tally["errors"] += 1
            error = output["error"]
            assert list(output) == ["error"] and isinstance(error, str), output
            assert error.split(":", 1)[0] in ("input", "dataset"), error
            assert "unexpected" not in error and "Traceback" not in error, error
        else:
            tally["valid"] += 1
            assert output["status"] == "valid" and {"job_id", "base_model", "dataset"} <= set(output), output
            hp = TrainingJob.from_payload(job).hyperparameters
            assert all(not isinstance(v, float) or math.isfinite(v) for v in hp.model_dump().values()), hp

    check()
    assert tally["examples"] >= EXAMPLES
