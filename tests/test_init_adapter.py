"""Continued training: a job names ``init_adapter``; it is verified against the job's base before any
weight loads, then trained further (not replaced by a fresh adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import handler
from adapters.manifest import read_manifest
from config.job import TrainingJob
from errors import InputError
from files import verify_files
from storage.records import SqliteRecords
from tests.conftest import small_job
from tests.test_verify import forbid_weight_loading


def _adapter_dir(output: dict) -> Path:
    assert "error" not in output, output
    return Path(output["adapter"]["uri"].removeprefix("file://"))


def test_a_job_continues_from_its_init_adapter(volume):
    first = handler.handler({"id": "a", "input": small_job(job_id="first")})
    first_dir = _adapter_dir(first)
    init_ref = first_dir.relative_to(volume).as_posix()  # a path on the volume

    second = handler.handler({"id": "b", "input": small_job(job_id="second", init_adapter=init_ref)})

    second_dir = _adapter_dir(second)
    # It started where the first one ended: its first loss is far below the fresh start's.
    assert second["metrics"]["first_loss"] < first["metrics"]["first_loss"] - 0.1, (first["metrics"], second["metrics"])
    # ... and it trained further: same shapes, moved values.
    before, after = load_file(first_dir / "adapter_model.safetensors"), load_file(second_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)
    config = json.loads((second_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == sorted(first["lora"]["target_modules"])
    assert config["base_model_name_or_path"] == "tiny-llama"

    manifest = read_manifest(second_dir)
    assert verify_files(second_dir, manifest) == []
    assert manifest["init_adapter"]["uri"] == init_ref
    assert manifest["init_adapter"]["job_id"] == "first"
    assert manifest["init_adapter"]["verdict"] == "compatible"
    weights = {f["name"]: f["sha256"] for f in manifest["init_adapter"]["files"]}
    assert weights["adapter_model.safetensors"] == {
        f["name"]: f["sha256"] for f in first["adapter"]["files"]}["adapter_model.safetensors"]
    assert not any(p.name.endswith(".init-adapter") for p in (volume / "jobs").iterdir())


def test_an_init_adapter_for_another_model_fails_before_any_weight_loads(volume, trained_adapter, monkeypatch):
    mistral_adapter, _ = trained_adapter("mistral")
    shutil.copytree(mistral_adapter, volume / "adapters" / "from-mistral")
    attempts = forbid_weight_loading(monkeypatch)

    output = handler.handler({"id": "c", "input": small_job(job_id="wrong", init_adapter="adapters/from-mistral")})

    assert output["error"].startswith(
        "model: init_adapter adapters/from-mistral does not fit the base model: adapter trained on mistral "
        "(2 layers, hidden 64); base is llama (2 layers, hidden 64); model type: mistral in the adapter's "
        "base, llama in this base;")
    assert output["error"].endswith("Continue from an adapter trained on this base, or drop init_adapter to "
                                    "train a new one")
    assert attempts == []
    row = SqliteRecords(volume / "records.sqlite3").get_job("wrong")
    assert (row["status"], row["stage"]) == ("failed", "model")

    validated = handler.handler({"id": "d", "input": small_job(action="validate", init_adapter="adapters/from-mistral")})
    assert validated["error"].startswith("model: init_adapter adapters/from-mistral does not fit the base model")
    assert attempts == []


def test_a_damaged_init_adapter_is_an_input_error(volume, trained_adapter, model_factory):
    llama_adapter, _ = trained_adapter("llama")
    target = volume / "adapters" / "changed"
    shutil.copytree(llama_adapter, target)
    (target / "adapter_config.json").write_text((target / "adapter_config.json").read_text() + " ")

    output = handler.handler({"id": "e", "input": small_job(init_adapter="adapters/changed")})

    assert output["error"] == ("input: init_adapter adapters/changed is damaged: adapter_config.json does not "
                               "match the sha256 in manifest.json (changed after training, or a broken download); upload it again or "
                               "name another adapter")


def test_init_adapter_outside_the_volume_or_with_other_settings_is_refused(volume, tmp_path):
    output = handler.handler({"id": "f", "input": small_job(init_adapter=str(tmp_path))})
    assert output["error"].startswith(f"input: init_adapter {str(tmp_path)!r} is outside the allowed folders")

    first_dir = _adapter_dir(handler.handler({"id": "g", "input": small_job(job_id="base-run")}))
    ref = first_dir.relative_to(volume).as_posix()
    output = handler.handler({"id": "h", "input": small_job(init_adapter=ref, hyperparameters={"lora_r": 16})})
    assert output["error"] == (f"input: hyperparameters.lora_r is 16 but init_adapter {ref} has r=8; drop lora_r "
                               "(continued training keeps the adapter's own) or set it to the adapter's")


@pytest.mark.parametrize("value, message", [
    ("ftp://host/adapter", "init_adapter: must be an s3:// or https:// URI of an adapter folder, or a path on "
                           "the volume; got a ftp:// URI"),
    ("adapters/../../etc", "init_adapter: may not contain '..'; name the adapter folder directly"),
])
def test_init_adapter_references_are_checked_in_the_schema(value, message):
    with pytest.raises(InputError) as info:
        TrainingJob.from_payload(small_job(init_adapter=value))
    assert str(info.value) == message


def test_an_s3_init_adapter_is_fetched_and_verified_against_the_base(trained_adapter, s3_server, shared_s3_bucket,
                                                                     tmp_path, monkeypatch):
    """The worker's side of an s3:// init_adapter (the job itself needs the S3 artifact store)."""
    s3_bucket = shared_s3_bucket
    from adapters.init import prepare_init_adapter
    from config.settings import WorkerSettings
    from errors import ModelError
    from tests.conftest import worker_env_names

    for name in worker_env_names():
        monkeypatch.delenv(name, raising=False)
    for key, value in s3_server.env(s3_bucket).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VOLUME_ROOT", str(tmp_path / "volume"))
    settings = WorkerSettings()
    llama_adapter, llama_base = trained_adapter("llama")
    mistral_adapter, _ = trained_adapter("mistral")
    client = s3_server.client()
    for name, folder in (("llama", llama_adapter), ("mistral", mistral_adapter)):
        for path in folder.iterdir():
            client.upload_file(str(path), s3_bucket, f"init/adapters/{name}/adapter/{path.name}")

    init = prepare_init_adapter(f"s3://{s3_bucket}/init/adapters/llama/adapter/", llama_base, tmp_path / "work", settings)
    assert init.verdict == "compatible" and init.job_id == "adapter-llama"
    assert init.path.is_relative_to(tmp_path / "work")
    assert (init.path / "adapter_model.safetensors").read_bytes() == (llama_adapter / "adapter_model.safetensors").read_bytes()

    with pytest.raises(ModelError) as info:
        prepare_init_adapter(f"s3://{s3_bucket}/init/adapters/mistral/", llama_base, tmp_path / "work", settings)
    assert str(info.value).startswith(f"init_adapter s3://{s3_bucket}/init/adapters/mistral/ does not fit the base "
                                      "model: adapter trained on mistral (2 layers, hidden 64); base is llama")
    with pytest.raises(InputError) as info:
        prepare_init_adapter(f"s3://{s3_bucket}/init/adapters/none/", llama_base, tmp_path / "work", settings)
    assert str(info.value).startswith(f"init_adapter: there is nothing under s3://{s3_bucket}/init/adapters/none/")
    assert s3_server.secret_key not in str(info.value)


# --- adapters from URLs go through the guarded client ------------------------------------------------


@pytest.fixture
def adapter_server(trained_adapter):
    from tests.http_server import start_file_server

    adapter, base = trained_adapter("llama")
    server = start_file_server()
    for path in adapter.iterdir():
        server.files[f"/adapter/{path.name}"] = path.read_bytes()
    yield server, base
    server.stop()


def test_an_init_adapter_url_on_loopback_needs_allow_private_urls(adapter_server, volume, tmp_path):
    from adapters.init import prepare_init_adapter
    from config.settings import WorkerSettings

    server, base = adapter_server
    url = server.url("/adapter/manifest.json?X-Amz-Signature=deadbeefsecret")
    with pytest.raises(InputError) as info:
        prepare_init_adapter(url, base, tmp_path / "work", WorkerSettings())
    assert str(info.value) == (f"init_adapter could not be fetched: {server.url('/adapter/manifest.json')} points "
                               "at 127.0.0.1, a loopback address; set ALLOW_PRIVATE_URLS=true on the endpoint to "
                               "allow it. Adapters are fetched from public addresses only")
    assert info.value.stage == "input" and not info.value.retryable
    assert server.requests == []  # refused before connecting

    init = prepare_init_adapter(url, base, tmp_path / "work", WorkerSettings(allow_private_urls=True))
    assert init.verdict == "compatible" and init.job_id == "adapter-llama"
    assert "deadbeefsecret" not in init.source
    assert sorted(p.name for p in init.path.iterdir()) == sorted(
        p.split("/")[-1] for p in server.files)  # the manifest's files, and no temporary ones


def test_an_adapter_file_over_the_cap_is_cut_while_streaming(tmp_path):
    from adapters.fetch import fetch_adapter
    from errors import StorageError
    from tests.http_server import start_file_server

    server = start_file_server()
    try:
        cap = 1 << 20
        server.files["/a/adapter_config.json"] = b"x" * (cap + 1)
        with pytest.raises(StorageError) as info:  # a declared Content-Length: refused before the body
            fetch_adapter([server.url("/a/adapter_config.json")], tmp_path / "one", max_file_bytes=cap)
        assert f"is {cap + 1} bytes, over the {cap}-byte cap for one adapter file" in str(info.value)

        server.streams["/a/adapter_model.safetensors"] = (b"x" * 65536, 4096)  # 256 MiB, no Content-Length
        with pytest.raises(StorageError) as info:
            fetch_adapter([server.url("/a/adapter_model.safetensors")], tmp_path / "two", max_file_bytes=cap)
        assert f"is more than {cap} bytes, over the {cap}-byte cap for one adapter file" in str(info.value)
        assert server.sent["/a/adapter_model.safetensors"] < 64 << 20
        assert list((tmp_path / "two").iterdir()) == []  # nothing half-written is left
    finally:
        server.stop()


def test_an_adapter_url_with_a_password_is_refused_without_echoing_it(tmp_path):
    from adapters.fetch import fetch_adapter
    from errors import StorageError

    with pytest.raises(StorageError) as info:
        fetch_adapter(["https://alice:hunter2secret@example.com/adapter/manifest.json"], tmp_path / "a")
    assert str(info.value) == ("https://example.com/adapter/manifest.json: URLs with a user name or password are "
                               "refused (they would be logged); use a signed URL instead")
    assert not (tmp_path / "a").exists()
