"""Issue 13, findings 2, 3 and 10 (fixed in the issue-10 refactor): each original attack, replayed
through ``handler.handler`` on a fresh volume, stays closed."""

from __future__ import annotations

import json
import logging

import handler
from storage.records import SqliteRecords
from tests.conftest import small_job


def test_2_an_init_adapter_on_loopback_is_refused_before_connecting(volume):
    from tests.http_server import start_file_server

    server = start_file_server()
    try:
        server.files["/adapter/manifest.json"] = b"{}"
        server.redirects["/hop/manifest.json"] = "/adapter/manifest.json"
        for path in ("/adapter/manifest.json", "/hop/manifest.json"):
            output = handler.handler({"id": "rp", "input": small_job(
                job_id="ssrf-init", init_adapter=server.url(path))})
            assert output["error"].startswith("input: init_adapter could not be fetched: "), output
            assert "a loopback address" in output["error"] and "ALLOW_PRIVATE_URLS" in output["error"]
        assert server.requests == []  # refused at the address check, before any connection
        assert not [p for p in (volume / "jobs").rglob("*") if p.is_file() and p.suffix != ".lock"]
    finally:
        server.stop()


def test_3_credentials_in_an_init_adapter_url_appear_nowhere(volume, caplog):
    caplog.set_level(logging.INFO)
    url = "https://alice:hunter2secret@example.com/adapter/manifest.json"
    output = handler.handler({"id": "rp", "input": small_job(job_id="creds", init_adapter=url)})
    assert output["error"].startswith("input: "), output
    row = SqliteRecords(volume / "records.sqlite3").get_job("creds")
    for text in (output["error"], caplog.text, json.dumps(row or {})):
        assert "hunter2secret" not in text and "alice:" not in text


def test_10_deeply_nested_metadata_answers_an_error_without_a_traceback(volume):
    nested: dict = {}
    for _ in range(1000):
        nested = {"a": nested}
    output = handler.handler({"id": "rp", "input": small_job(job_id="deep", metadata={"user_id": "u", "x": nested})})
    assert set(output) == {"error"} and output["error"].split(":", 1)[0] in ("input", "record", "train"), output
    assert "Traceback" not in output["error"]
