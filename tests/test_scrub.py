"""errors.scrub: no secret, token or signed-URL query leaves the process, and scrubbing twice is a no-op."""

from __future__ import annotations

import logging

import pytest

from errors import ScrubFilter, scrub

CASES = [
    ("GET https://p.supabase.co/storage/v1/object/sign/d.jsonl?token=eyJabc.def&x=1 failed",
     "GET https://p.supabase.co/storage/v1/object/sign/d.jsonl?<redacted> failed"),
    ('urllib3: "GET /storage/v1/object/sign/d.jsonl?token=abc HTTP/1.1" 403',
     'urllib3: "GET /storage/v1/object/sign/d.jsonl?<redacted> HTTP/1.1" 403'),
    ("s3://bucket/key?X-Amz-Signature=deadbeef", "s3://bucket/key?<redacted>"),
    ("token hf_abcdefghijklmnopqrstuvwxyz0123 in use", "token hf_<redacted> in use"),
    ("Authorization: Bearer sk-live-123", "Authorization: <redacted>"),
    ('{"apikey": "service-role-jwt"}', '{"apikey": "<redacted>"}'),
    ("key AKIAABCDEFGHIJKLMNOP", "key <redacted-key-id>"),
    ("is 1/2? no", "is 1/2? no"),  # a question mark that ends a sentence is not a query
]


@pytest.mark.parametrize("text,expected", CASES)
def test_scrub_removes_secrets_and_is_idempotent(text, expected):
    assert scrub(text) == expected
    assert scrub(scrub(text)) == expected


def test_known_secret_values_are_masked_in_log_records(caplog):
    logger = logging.getLogger("scrub-test")
    handler = logging.Handler()
    seen = []
    handler.emit = lambda record: seen.append(record.getMessage())
    handler.addFilter(ScrubFilter(["s3cr3t-value"]))
    logger.addHandler(handler)
    try:
        logger.warning("connecting with %s to %s", "s3cr3t-value", "https://h/x?sig=1")
        try:
            raise ValueError("bad key s3cr3t-value")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert seen[0] == "connecting with <redacted> to https://h/x?<redacted>"
    assert "s3cr3t-value" not in seen[1] and "Traceback" not in seen[1] and "ValueError" in seen[1]
