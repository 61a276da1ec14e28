"""handler.handler answers every failure as ``{"error": "<stage>: …"}``: nothing escapes it, no traceback
or secret shows, a settings error is classified by what failed (never by its words), and ``main`` builds
the settings and the logging once for every job."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

import errors
import handler
from tests.conftest import small_job


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_a_payload_nested_1000_deep_is_an_error_never_an_exception(volume):
    output = handler.handler({"id": "deep", "input": small_job(job_id="deep", metadata=_nested(1000))})
    assert list(output) == ["error"], output
    stage, _, sentence = output["error"].partition(": ")
    assert stage in ("input", "model", "dataset", "train", "upload", "record") and sentence, output
    assert "Traceback" not in output["error"] and "\n" not in output["error"]


def test_an_unexpected_exception_says_its_stage_and_type_scrubbed(volume, monkeypatch):
    import pipeline

    token = "hf_abcdefghijklmnopqrstuvwxyz012345"
    monkeypatch.setenv("HF_TOKEN", token)

    def explode(*args, **kwargs):
        raise RecursionError(f"maximum recursion depth exceeded near {token}\n  in frame x")

    monkeypatch.setattr(pipeline, "run", explode)
    output = handler.handler({"id": "boom", "input": small_job()})
    assert output == {"error": "train: unexpected RecursionError: maximum recursion depth exceeded near "
                               "<redacted> in frame x"}


def test_an_unexpected_exception_before_the_job_is_valid_is_an_input_error(volume, monkeypatch):
    def explode(*args, **kwargs):
        raise TypeError("cannot read this payload")

    monkeypatch.setattr(handler.TrainingJob, "from_payload", explode)
    assert handler.handler({"id": "t", "input": small_job()}) == {
        "error": "input: unexpected TypeError: cannot read this payload"}


SETTINGS_ERRORS = [
    ("S3 half-configured", {"S3_BUCKET": "b"}, "upload: worker settings: S3 is half-configured"),
    ("Supabase half-configured", {"SUPABASE_URL": "http://x"},
     "record: worker settings: Supabase is half-configured"),
    ("an S3 variable", {"PRESIGN_SECONDS": "soon"}, "upload: worker settings: presign_seconds: "),
    # "S3" in the message text, but the variable is no S3 one: the stage comes from the variable
    ("another variable", {"MAX_TRAIN_SECONDS": "S3"}, "input: worker settings: max_train_seconds: "),
]


@pytest.mark.parametrize("name,env,expected", SETTINGS_ERRORS, ids=[c[0] for c in SETTINGS_ERRORS])
def test_a_settings_error_belongs_to_the_stage_of_what_failed(volume, monkeypatch, name, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    output = handler.handler({"id": "s", "input": small_job()})
    assert output["error"].startswith(expected), output


def test_a_requests_secrets_are_scrubbed_from_logs_while_its_job_runs(volume, monkeypatch):
    import pipeline

    secret = "request-only-s3-secret"
    seen: list[str] = []
    capture = logging.Handler()
    capture.emit = lambda record: seen.append(record.getMessage())
    capture.addFilter(errors.ScrubFilter())  # no secrets of its own: the job's come from job_secrets
    log = logging.getLogger("test-job-secrets")
    log.addHandler(capture)
    log.propagate = False

    def run(job, settings, **kwargs):
        # a thread the job starts (as boto3's transfers do) logs under the same scrubbing
        worker = threading.Thread(target=log.warning, args=("uploading with %s", secret))
        worker.start()
        worker.join()
        return {"status": "succeeded"}

    monkeypatch.setattr(pipeline, "run", run)
    config = {"accessId": "request-key-id", "accessSecret": secret, "bucketName": "bucket"}
    try:
        output = handler.handler({"id": "s3c", "input": small_job(), "s3Config": config})
    finally:
        log.removeHandler(capture)
        log.propagate = True
    assert output == {"status": "succeeded"}
    assert seen == ["uploading with <redacted>"]
    assert errors.running_job_secrets() == ()  # only for the job's duration


def test_main_builds_settings_and_logging_once_for_every_job(volume, monkeypatch):
    import runpod

    import pipeline

    built = []
    real_settings = handler.WorkerSettings
    monkeypatch.setattr(handler, "WorkerSettings", lambda: built.append(1) or real_settings())
    started = {}
    monkeypatch.setattr(runpod.serverless, "start", started.update)
    monkeypatch.setattr(pipeline, "run", lambda job, settings, **kwargs: {"status": "succeeded"})
    monkeypatch.setenv("RUNPOD_LOG_LEVEL", "INFO")
    handler.get_settings.cache_clear()
    handler.main()

    root = logging.getLogger()
    filters = {id(h): list(h.filters) for h in root.handlers}
    for n in range(2):
        assert asyncio.run(started["handler"]({"id": f"j{n}", "input": small_job()})) == {"status": "succeeded"}
    assert len(built) == 1
    assert {id(h): list(h.filters) for h in root.handlers} == filters  # logging is not reconfigured per job
    assert all(sum(isinstance(f, errors.ScrubFilter) for f in h.filters) <= 1 for h in root.handlers)
