"""The job schema, the worker and the Edge Function agree.

- ``schema/job-input.schema.json`` is what ``python cli.py schema`` prints (the CLI, run as a user runs it);
- the Edge Function's copy (``supabase/functions/process-training-jobs/job-input.schema.json``) is that file;
- the cases in ``testdata/job_inputs.json``, which the function's Deno tests (``schema_test.ts``) run through
  its schema validation, get the same verdict from the worker's own model here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from config.job import TrainingJob
from errors import InputError
from tests.conftest import ROOT

FUNCTION = ROOT / "supabase" / "functions" / "process-training-jobs"
CASES = json.loads((FUNCTION / "testdata" / "job_inputs.json").read_text())["cases"]


def test_the_committed_schema_is_what_the_cli_prints():
    printed = subprocess.run([sys.executable, "cli.py", "schema"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert json.loads(printed) == json.loads((ROOT / "schema" / "job-input.schema.json").read_text()), (
        "regenerate it: python cli.py schema > schema/job-input.schema.json")


def test_the_edge_function_validates_against_the_committed_schema():
    assert (FUNCTION / "job-input.schema.json").read_text() == \
        (ROOT / "schema" / "job-input.schema.json").read_text(), (
        "copy it: cp schema/job-input.schema.json supabase/functions/process-training-jobs/")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_worker_agrees_with_each_shared_case(case):
    if case["worker_valid"]:
        TrainingJob.from_payload(case["input"])
    else:
        with pytest.raises(InputError):
            TrainingJob.from_payload(case["input"])
    # The schema may let through only what needs more than a schema (paths, cross-field rules); it
    # never refuses what the worker accepts.
    assert case["schema_valid"] or not case["worker_valid"]


def test_the_cases_cover_both_verdicts_and_the_rules_beyond_the_schema():
    verdicts = {(c["schema_valid"], c["worker_valid"]) for c in CASES}
    assert verdicts == {(True, True), (False, False), (True, False)}
