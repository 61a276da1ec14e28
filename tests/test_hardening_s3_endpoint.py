"""Issue 13, finding 4: a request's s3Config.endpointUrl gets the address policy of every URL.

The operator's own S3_ENDPOINT_URL may point at a private store; a request may not, unless the
operator allowed private addresses (ALLOW_PRIVATE_URLS), and never at link-local/metadata addresses.
"""

from __future__ import annotations

import json

import pytest

import handler
from tests.conftest import small_job


@pytest.fixture
def internal_service():
    """A loopback service that answers JSON to anything, as an internal API would."""
    from tests.http_server import start_file_server

    server = start_file_server()
    body = json.dumps({"internal_secret_field": "x", "admin_token_key": "y"}).encode()
    for path in ("/bucket/train.jsonl", "/bucket", "/bucket/", "/"):
        server.files[path] = body
    yield server
    server.stop()


def _config(endpoint: str) -> dict:
    return {"accessId": "request-key-id", "accessSecret": "request-secret-value", "bucketName": "bucket",
            "endpointUrl": endpoint}


def test_a_request_endpoint_on_loopback_is_refused_before_any_request(volume, internal_service):
    job = {"id": "rp", "input": small_job(job_id="ssrf", dataset={"uri": "s3://bucket/train.jsonl"}),
           "s3Config": _config(internal_service.url(""))}
    output = handler.handler(job)
    assert output["error"].startswith("upload: the request's s3Config.endpointUrl"), output
    assert "127.0.0.1, a loopback address" in output["error"]
    assert internal_service.requests == []
    assert "internal_secret_field" not in output["error"] and "request-secret-value" not in output["error"]


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254", "http://[fe80::1]:9000", "http://0.0.0.0:9000"])
def test_link_local_and_unspecified_endpoints_are_refused_even_when_private_ones_are_allowed(
        volume, monkeypatch, endpoint):
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    handler.get_settings.cache_clear()
    output = handler.handler({"id": "rp", "input": small_job(job_id="meta"), "s3Config": _config(endpoint)})
    assert output["error"].startswith("upload: the request's s3Config.endpointUrl"), output


def test_the_operators_own_private_endpoint_is_accepted_in_a_request_too(volume, monkeypatch):
    """The environment's endpoint is the operator's choice: a request naming the same one is not refused."""
    from config.settings import WorkerSettings

    env = {"S3_BUCKET": "b", "S3_ENDPOINT_URL": "http://10.0.0.5:9000", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    job_settings = handler._job_settings({"s3Config": _config("http://10.0.0.5:9000")}, settings)
    assert job_settings.s3_endpoint_url == "http://10.0.0.5:9000"
    with pytest.raises(Exception, match="private-network address"):
        handler._job_settings({"s3Config": _config("http://10.0.0.6:9000")}, settings)


@pytest.mark.parametrize("code, shown", [("SlowDown", "the store answered SlowDown"),
                                         ('{"admin_token_key": 1}', "the store answered an unexpected error")])
def test_store_errors_show_no_words_from_the_endpoint(code, shown):
    from botocore.exceptions import ClientError

    from storage.artifacts import S3ArtifactStore

    store = S3ArtifactStore(client=None, bucket="b", endpoint="http://store")
    exc = ClientError({"Error": {"Code": code, "Message": "internal_secret_field=42"}}, "GetObject")
    message = str(store._error("read", "k", exc))
    assert message == f"could not read s3://b/k: {shown}"
    assert "internal_secret_field" not in message
