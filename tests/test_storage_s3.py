"""The S3 artifact store against a real S3 server on loopback (SeaweedFS, tests/services.py):
layout, server-verified checksums, manifests last, presigned downloads, exactly once, nothing lost."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import requests

import handler
from config.settings import WorkerSettings
from errors import StorageError
from files import MANIFEST_NAME, describe_files, write_json_atomic
from storage.artifacts import LocalArtifactStore, S3ArtifactStore, open_artifact_store
from storage.records import SqliteRecords, SupabaseRecords
from tests.conftest import small_job
from tests.postgrest_server import SERVICE_ROLE_KEY, FakePostgrest

MiB = 1024 * 1024
WRITES = {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "DeleteObject"}


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _settings(s3_server, bucket: str, tmp_path: Path, **extra) -> WorkerSettings:
    return WorkerSettings(volume_root=tmp_path, s3_bucket=bucket, s3_endpoint_url=s3_server.endpoint,
                          aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key,
                          aws_region="us-east-1", **extra)


def _keys(client, bucket: str) -> dict[str, dict]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def make_job_dir(root: Path, big_bytes: int = 0) -> Path:
    """A finished job folder as pipeline._write_job_folder leaves it: adapter files, report files,
    then the adapter's manifest, then the job's manifest."""
    job_dir = root / "job"
    adapter = job_dir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(big_bytes or 70_000))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "r": 8}))
    (adapter / "README.md").write_text("# adapter\n")
    (job_dir / "metrics.json").write_text(json.dumps({"train_loss": 1.0}))
    (job_dir / "train_log.jsonl").write_text('{"step": 1}\n')
    manifest = {"job_id": "job-1", "base_model": {"id": "org/base", "revision": "abc", "fingerprint": "sha256:f"},
                "peft": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}, "metrics": {"train_loss": 1.0},
                "dataset": {"examples": 3}}
    files = [vars(f) for f in describe_files(adapter)]
    write_json_atomic(adapter / MANIFEST_NAME, {**manifest, "files": files})
    write_json_atomic(job_dir / MANIFEST_NAME, {**manifest, "files": [vars(f) for f in describe_files(job_dir)]})
    return job_dir


@pytest.fixture
def calls(monkeypatch):
    """Every S3 operation the worker's own clients make: (operation, key), in order."""
    import storage.s3

    seen: list[tuple[str, str | None]] = []
    real = storage.s3.make_s3_client

    def make(settings, **kwargs):
        client = real(settings, **kwargs)

        def record(params, model, **_):
            seen.append((model.name, params.get("Key")))

        client.meta.events.register("before-parameter-build.s3", record)
        return client

    monkeypatch.setattr(storage.s3, "make_s3_client", make)
    return seen


@pytest.fixture
def store(s3_server, s3_bucket, tmp_path, calls):
    from boto3.s3.transfer import TransferConfig

    settings = _settings(s3_server, s3_bucket, tmp_path, s3_prefix="runs", presign_seconds=600)
    chosen = open_artifact_store(settings)
    assert isinstance(chosen, S3ArtifactStore)
    # 5 MiB parts (S3's smallest) so that a 12 MiB file takes the multipart path.
    chosen.transfer_config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                            max_concurrency=4, preferred_transfer_client="classic")
    return chosen


def test_put_lays_out_the_job_with_server_verified_checksums(store, s3_server, s3_bucket, tmp_path, calls):
    job_dir = make_job_dir(tmp_path, big_bytes=12 * MiB)
    stored = store.put(job_dir, "team-a", "job-1")

    root = "runs/team-a/job-1/"
    assert stored.uri == f"s3://{s3_bucket}/{root}"
    assert stored.adapter_uri == f"s3://{s3_bucket}/{root}adapter/"
    local = {p.relative_to(job_dir).as_posix(): p for p in job_dir.rglob("*") if p.is_file()}
    client = s3_server.client()
    # and the owner claim, written first (one job_id owns one place)
    assert set(_keys(client, s3_bucket)) == {root + rel for rel in local} | {root + ".job-owner.json"}
    assert json.loads(client.get_object(Bucket=s3_bucket, Key=root + ".job-owner.json")["Body"].read()) == {
        "job_id": "job-1"}
    for rel, path in local.items():
        head = client.head_object(Bucket=s3_bucket, Key=root + rel, ChecksumMode="ENABLED")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert head["ContentLength"] == path.stat().st_size and head["Metadata"]["sha256"] == sha
        if path.stat().st_size < 5 * MiB:
            assert head["ChecksumSHA256"] == _b64(sha), rel  # the server's SHA-256 of what it stored
        else:
            parts = [hashlib.sha256(path.read_bytes()[i:i + 5 * MiB]).digest()
                     for i in range(0, path.stat().st_size, 5 * MiB)]
            composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
            assert head["ChecksumSHA256"] == f"{composite}-3" and head.get("ChecksumType") == "COMPOSITE"
        assert client.get_object(Bucket=s3_bucket, Key=root + rel)["Body"].read() == path.read_bytes()

    # Manifests last: the adapter's, then the job's, after every other object is complete.
    completed = [key for op, key in calls if op in ("PutObject", "CompleteMultipartUpload")]
    assert completed[-2:] == [root + "adapter/manifest.json", root + "manifest.json"]
    assert completed[0] == root + ".job-owner.json" and len(completed) == len(local) + 1
    assert stored.files == describe_files(job_dir / "adapter")
    assert stored.bytes == sum(f.bytes for f in stored.files)
    assert stored.manifest.base.id == "org/base"


def test_find_complete_answers_only_a_complete_intact_upload(store, s3_server, s3_bucket, tmp_path):
    job_dir = make_job_dir(tmp_path)
    assert store.find_complete("team-a", "job-1") is None
    stored = store.put(job_dir, "team-a", "job-1")
    found = store.find_complete("team-a", "job-1")
    assert (found.uri, found.files, found.bytes, found.manifest) == (stored.uri, stored.files, stored.bytes,
                                                                     stored.manifest)
    client = s3_server.client()
    key = "runs/team-a/job-1/adapter/adapter_model.safetensors"
    original = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"\0" * len(original),
                      Metadata={"sha256": hashlib.sha256(original).hexdigest()})  # same size, claims the sha
    assert store.find_complete("team-a", "job-1") is None  # the server's checksum gives it away
    client.put_object(Bucket=s3_bucket, Key=key, Body=original)  # right bytes, not stored from a manifest
    assert store.find_complete("team-a", "job-1") is None
    client.delete_object(Bucket=s3_bucket, Key=key)
    assert store.find_complete("team-a", "job-1") is None
    assert store.find_complete("team-b", "job-1") is None


def test_a_second_put_uploads_only_what_is_missing(store, s3_server, s3_bucket, tmp_path, calls):
    job_dir = make_job_dir(tmp_path)
    store.put(job_dir, "", "job-1")
    s3_server.client().delete_object(Bucket=s3_bucket, Key="runs/job-1/metrics.json")
    calls.clear()
    store.put(job_dir, "", "job-1")
    uploaded = [key for op, key in calls if op == "PutObject"]
    assert uploaded == ["runs/job-1/metrics.json", "runs/job-1/adapter/manifest.json", "runs/job-1/manifest.json"]
    assert store.find_complete("", "job-1") is not None


def test_bytes_that_do_not_match_the_manifest_are_refused_by_the_server(store, s3_bucket, tmp_path):
    job_dir = make_job_dir(tmp_path)
    config = job_dir / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 8', '"r": 9'))  # changed after the manifest
    with pytest.raises(StorageError) as info:
        store.put(job_dir, "team-a", "job-1")
    assert str(info.value).startswith(f"could not upload s3://{s3_bucket}/runs/team-a/job-1/")
    assert "do not match their sha256 (BadDigest)" in str(info.value)
    assert store.find_complete("team-a", "job-1") is None


def test_presigned_urls_download_the_adapter(store, tmp_path):
    job_dir = make_job_dir(tmp_path)
    stored = store.put(job_dir, "team-a", "job-1")
    assert set(stored.download_urls) == {"adapter_model.safetensors", "adapter_config.json", "README.md",
                                         "manifest.json"}
    for name, url in stored.download_urls.items():
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
        reply = requests.get(url, timeout=30)
        assert reply.status_code == 200 and reply.content == (job_dir / "adapter" / name).read_bytes()
    assert stored.download_expires_at and "X-Amz" not in json.dumps(stored.to_output())


def test_store_errors_name_the_place_and_the_fix_and_no_secret(s3_server, tmp_path):
    job_dir = make_job_dir(tmp_path)
    missing = open_artifact_store(_settings(s3_server, "no-such-bucket-here", tmp_path))
    with pytest.raises(StorageError) as info:
        missing.find_complete("", "job-1")
    assert str(info.value) == ("could not read s3://no-such-bucket-here/job-1/manifest.json: bucket "
                               "'no-such-bucket-here' does not exist; create it or set S3_BUCKET to an "
                               "existing bucket")
    wrong = WorkerSettings(volume_root=tmp_path, s3_bucket="some-bucket", s3_endpoint_url=s3_server.endpoint,
                           aws_access_key_id=s3_server.access_key, aws_secret_access_key="wrong-secret-value-123")
    with pytest.raises(StorageError) as info:
        open_artifact_store(wrong).put(job_dir, "", "job-1")
    message = str(info.value)
    assert "the S3 credentials were refused" in message and "check AWS_ACCESS_KEY_ID" in message
    assert "wrong-secret-value-123" not in message


def test_without_a_bucket_artifacts_stay_on_the_volume(tmp_path):
    assert isinstance(open_artifact_store(WorkerSettings(volume_root=tmp_path)), LocalArtifactStore)


# --------------------------------------------------------------------------------------------------
# Through the handler: a real training job, stored in S3.


@pytest.fixture
def s3_env(volume, s3_server, s3_bucket, monkeypatch):
    for name, value in {**s3_server.env(s3_bucket), "S3_PREFIX": "runs", "PRESIGN_SECONDS": "900"}.items():
        monkeypatch.setenv(name, value)
    return s3_bucket


def _no_training(monkeypatch):
    import train_lora

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_lora, "train_lora", refuse)


def _same_output(first: dict, second: dict) -> None:
    strip = ("timings", "cost")
    assert {k: v for k, v in first.items() if k not in strip} == {k: v for k, v in second.items() if k not in strip}


@pytest.mark.slow
def test_s3_job_end_to_end_then_redelivered(s3_env, volume, s3_server, tiny_llama, calls, monkeypatch, caplog):
    bucket = s3_env
    job = {"id": "rp-s3", "input": small_job(job_id="s3-job", output={"prefix": "team-a"})}
    first = handler.handler(job)
    assert first["status"] == "succeeded", first
    root = "runs/team-a/s3-job/"
    assert first["adapter"]["uri"] == f"s3://{bucket}/{root}adapter/"
    assert first["adapter"]["job_uri"] == f"s3://{bucket}/{root}"
    client = s3_server.client()
    objects = _keys(client, bucket)
    names = {k.removeprefix(root) for k in objects}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/README.md",
            "adapter/manifest.json", "manifest.json", "metrics.json", "loss.png"} <= names
    for entry in first["adapter"]["files"]:
        head = client.head_object(Bucket=bucket, Key=f"{root}adapter/{entry['name']}", ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == _b64(entry["sha256"]) and head["ContentLength"] == entry["bytes"]
    assert not (volume / "jobs" / "s3-job").exists() and not (volume / "artifacts").exists()

    records = SqliteRecords(volume / "records.sqlite3")
    artifact = records.get_artifact("s3-job")
    assert artifact["id"] == first["record_id"] and artifact["uri"] == first["adapter"]["uri"]

    # The presigned URLs in the record download an adapter that loads onto its base.
    download = volume.parent / "downloaded"
    download.mkdir()
    for name, url in artifact["download_urls"].items():
        (download / name).write_bytes(requests.get(url, timeout=30).content)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(download))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert "X-Amz-Signature" not in json.dumps(first)

    # Delivered again: the stored artifact is found, nothing is trained or uploaded, one record.
    _no_training(monkeypatch)
    calls.clear()
    second = handler.handler(job)
    _same_output(first, second)
    assert not [c for c in calls if c[0] in WRITES], calls
    after = _keys(client, bucket)
    assert {k: (o["ETag"], o["LastModified"]) for k, o in after.items()} == \
        {k: (o["ETag"], o["LastModified"]) for k, o in objects.items()}
    assert records.get_artifact("s3-job")["id"] == first["record_id"]
    assert records.get_job("s3-job")["status"] == "succeeded"
    for secret in (s3_server.secret_key, "X-Amz-Signature"):
        assert secret not in caplog.text


@pytest.mark.slow
def test_s3_down_mid_upload_keeps_the_adapter_and_a_rerun_completes(s3_env, volume, s3_server, monkeypatch):
    import storage.s3

    real = storage.s3.make_s3_client
    stopped, puts = [], []

    def stop_after_first_object(http_response, parsed, model, **_):
        puts.append(True)
        if not stopped and len(puts) == 2:  # the first object after the owner claim
            stopped.append(True)
            s3_server.stop()

    def make(settings, **kwargs):
        client = real(settings, **{**kwargs, "max_attempts": 2, "connect_timeout": 2, "read_timeout": 10})
        client.meta.events.register("after-call.s3.PutObject", stop_after_first_object)
        return client

    monkeypatch.setattr(storage.s3, "make_s3_client", make)
    job = {"id": "rp-down", "input": small_job(job_id="down-job")}
    try:
        failed = handler.handler(job)
    finally:
        if stopped:
            s3_server.start()
    kept = volume / "jobs" / "down-job" / "adapter"
    assert stopped and failed["error"].startswith("upload: could not "), failed
    assert f"the trained adapter is kept at {kept}: re-run the job with the same job_id" in failed["error"]
    assert (kept / "adapter_model.safetensors").is_file() and (kept / "manifest.json").is_file()
    assert SqliteRecords(volume / "records.sqlite3").get_job("down-job")["status"] == "failed"
    assert s3_server.secret_key not in failed["error"]

    trained = [vars(f) for f in describe_files(kept)]
    monkeypatch.setattr(storage.s3, "make_s3_client", real)
    _no_training(monkeypatch)
    done = handler.handler(job)
    assert done["status"] == "succeeded", done
    assert done["adapter"]["files"] == trained  # the adapter trained before the outage, not a new one
    assert open_artifact_store(WorkerSettings()).find_complete("", "down-job") is not None
    assert not kept.exists()
    assert SqliteRecords(volume / "records.sqlite3").get_job("down-job")["status"] == "succeeded"


@pytest.mark.slow
def test_record_failure_names_the_s3_location_and_a_rerun_writes_it(s3_env, volume, calls, monkeypatch):
    bucket = s3_env
    postgrest = FakePostgrest().start()
    monkeypatch.setenv("SUPABASE_URL", postgrest.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.setattr(SupabaseRecords, "BACKOFF_S", 0.0)
    postgrest.fail(503, times=SupabaseRecords.ATTEMPTS, table="training_artifacts")
    job = {"id": "rp-rec", "input": small_job(job_id="rec-job")}
    try:
        failed = handler.handler(job)
        uri = f"s3://{bucket}/runs/rec-job/adapter/"
        assert failed["error"].startswith("record: could not write the training_artifacts row for job rec-job: "
                                          f"Supabase at {postgrest.url} answered HTTP 503 (5 attempts)"), failed
        assert failed["error"].endswith(f"the adapter is stored at {uri}: re-run the job with the same job_id "
                                        "to write the record without training again")
        assert postgrest.rows["training_artifacts"] == []
        (job_row,) = postgrest.rows["training_jobs"]
        assert job_row["status"] == "failed" and job_row["error"] == failed["error"]
        assert SERVICE_ROLE_KEY not in failed["error"]

        _no_training(monkeypatch)
        calls.clear()
        done = handler.handler(job)
        assert done["status"] == "succeeded" and done["adapter"]["uri"] == uri, done
        assert not [c for c in calls if c[0] in WRITES]  # the adapter was already stored
        (artifact,) = postgrest.rows["training_artifacts"]
        assert artifact["id"] == done["record_id"] and artifact["uri"] == uri
        assert set(artifact["download_urls"]) >= {"adapter_model.safetensors", "adapter_config.json"}
        (job_row,) = postgrest.rows["training_jobs"]
        assert (job_row["status"], job_row["error"]) == ("succeeded", None)
    finally:
        postgrest.stop()


@pytest.mark.slow
def test_a_requests_s3config_is_used_and_never_leaks(volume, s3_server, s3_bucket, monkeypatch, caplog):
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")  # the test store is on loopback: the operator allows it
    handler.get_settings.cache_clear()
    config = {"accessId": s3_server.access_key, "accessSecret": s3_server.secret_key, "bucketName": s3_bucket,
              "endpointUrl": s3_server.endpoint}
    output = handler.handler({"id": "rp-cfg", "input": small_job(job_id="cfg-job"), "s3Config": config})
    assert output["adapter"]["uri"] == f"s3://{s3_bucket}/cfg-job/adapter/", output
    assert "cfg-job/manifest.json" in _keys(s3_server.client(), s3_bucket)
    assert s3_server.secret_key not in json.dumps(output) + caplog.text
    assert s3_server.secret_key not in os.environ.values()

    bad = handler.handler({"id": "rp-bad", "input": small_job(job_id="cfg-bad"),
                           "s3Config": {**config, "accessSecret": "", "bucketName": 7}})
    assert bad["error"] == ("upload: the request's s3Config is missing or has invalid accessSecret, bucketName; "
                            "it needs accessId, accessSecret and bucketName (and endpointUrl for an "
                            "S3-compatible store)")
    assert s3_server.access_key not in bad["error"]


ENDPOINTS = [
    ("compatible store", "http://127.0.0.1:9000", None, "http://127.0.0.1:9000", "path", "us-east-1",
     "http://127.0.0.1:9000/adapters/k"),
    ("RunPod bucket URL", "https://adapters.s3.eu-west-2.amazonaws.com", None,
     "https://s3.eu-west-2.amazonaws.com", "virtual", "eu-west-2", "https://adapters.s3.eu-west-2.amazonaws.com/k"),
    ("AWS regional", "https://s3.us-west-2.amazonaws.com", None, "https://s3.us-west-2.amazonaws.com",
     "virtual", "us-west-2", "https://adapters.s3.us-west-2.amazonaws.com/k"),
    ("region given", "https://s3.amazonaws.com", "ap-south-1", "https://s3.amazonaws.com", "virtual",
     "ap-south-1", "https://adapters.s3.amazonaws.com/k"),
]


@pytest.mark.parametrize("name,endpoint,region,want_endpoint,want_style,want_region,want_url", ENDPOINTS,
                         ids=[e[0] for e in ENDPOINTS])
def test_endpoints_address_the_bucket_as_the_store_expects(tmp_path, name, endpoint, region, want_endpoint,
                                                          want_style, want_region, want_url):
    from storage.s3 import make_s3_client, s3_endpoint

    settings = WorkerSettings(volume_root=tmp_path, s3_bucket="adapters", s3_endpoint_url=endpoint,
                              aws_access_key_id="AKIAEXAMPLEEXAMPLE00", aws_secret_access_key="s" * 40,
                              aws_region=region)
    assert s3_endpoint(settings) == (want_endpoint, want_style, want_region)
    url = make_s3_client(settings).generate_presigned_url("get_object", Params={"Bucket": "adapters", "Key": "k"})
    assert url.split("?")[0] == want_url and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    assert f"%2F{want_region}%2Fs3%2Faws4_request" in url  # signed for the bucket's region
