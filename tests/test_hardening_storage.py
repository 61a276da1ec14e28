"""Issue 13, finding 5: one job_id owns one artifact location, whatever the prefix.

Job ``adapter`` with prefix ``victim`` would land at ``victim/adapter/``: inside job ``victim``'s
location (prefix ""), on top of its ``adapter/`` folder. Both orders, both stores, through the handler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import handler
from files import sha256_file
from storage.records import SqliteRecords
from tests.conftest import small_job


def _train(job_id: str, prefix: str, epochs: int = 2) -> dict:
    return handler.handler({"id": job_id, "input": small_job(
        job_id=job_id, output={"prefix": prefix}, hyperparameters={"epochs": epochs})})


def _weights(uri: str) -> str:
    return sha256_file(Path(uri.removeprefix("file://")) / "adapter_model.safetensors")


def test_a_job_cannot_write_into_another_jobs_location_locally(volume):
    victim = _train("victim", "")
    assert victim["status"] == "succeeded", victim
    before = _weights(victim["adapter"]["uri"])

    attacker = _train("adapter", "victim", epochs=1)
    assert attacker["error"].startswith("input: "), attacker
    assert "'victim'" in attacker["error"] and "output.prefix" in attacker["error"]
    assert _weights(victim["adapter"]["uri"]) == before  # the victim's adapter is untouched
    record = SqliteRecords(volume / "records.sqlite3").get_artifact("victim")
    assert record["uri"] == victim["adapter"]["uri"]
    assert not (volume / "artifacts" / "victim" / "adapter" / "adapter").exists()


def test_a_job_cannot_take_a_location_that_holds_another_job(volume):
    squatter = _train("adapter", "victim", epochs=1)
    assert squatter["status"] == "succeeded", squatter
    kept = _weights(squatter["adapter"]["uri"])
    victim = _train("victim", "")  # its location would contain the squatter's
    assert victim["error"].startswith("input: "), victim
    assert "'adapter'" in victim["error"]
    assert _weights(squatter["adapter"]["uri"]) == kept


@pytest.fixture
def s3_env(volume, s3_server, s3_bucket, monkeypatch):
    for name, value in {**s3_server.env(s3_bucket), "S3_PREFIX": "runs"}.items():
        monkeypatch.setenv(name, value)
    handler.get_settings.cache_clear()
    return s3_bucket


def test_a_job_cannot_write_into_another_jobs_location_on_s3(s3_env, s3_server):
    bucket = s3_env
    client = s3_server.client()
    victim = _train("victim", "")
    assert victim["status"] == "succeeded", victim
    key = "runs/victim/adapter/adapter_model.safetensors"
    before = client.head_object(Bucket=bucket, Key=key)["ETag"]

    attacker = _train("adapter", "victim", epochs=1)
    assert attacker["error"].startswith("input: "), attacker
    assert client.head_object(Bucket=bucket, Key=key)["ETag"] == before
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any(k.startswith("runs/victim/adapter/adapter/") for k in keys), keys
    assert not any(k == "runs/victim/adapter/metrics.json" for k in keys), keys
