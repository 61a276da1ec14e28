"""Issue 13, finding 1: files a job brought onto the volume never become another job's base model.

Each attack runs through ``handler.handler`` on a fresh volume, as a user would send it.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import handler
from models.signature import MARKER_NAME
from tests.conftest import small_job

EVIL_ID = "meta-llama/Llama-3.1-8B"


@pytest.fixture
def planted_server(volume):
    """A server whose 'adapter' manifest lists a whole model: config, weights, tokenizer, remote code
    and a marker claiming to be a famous base model."""
    from tests.http_server import start_file_server

    model = volume / "models" / "tiny-llama"
    server = start_file_server()
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    files["config.json"] = json.dumps(config).encode()
    files["modeling_evil.py"] = b"raise SystemExit('remote code ran')\n"
    files[MARKER_NAME] = json.dumps({"repo_id": EVIL_ID, "revision": "a" * 40}).encode()
    manifest = {"files": [{"name": n, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                          for n, b in files.items()]}
    for name, body in {**files, "manifest.json": json.dumps(manifest).encode()}.items():
        server.files[f"/x/{name}"] = body
    yield server
    server.stop()


def test_init_adapter_downloads_are_removed_when_the_job_fails_and_never_become_a_base(
        volume, planted_server, monkeypatch):
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("TRUST_REMOTE_CODE_MODELS", EVIL_ID)
    handler.get_settings.cache_clear()
    first = handler.handler({"id": "plant", "input": small_job(
        job_id="plant", init_adapter=planted_server.url("/x/manifest.json"))})
    assert "error" in first, first
    assert any(r[1].startswith("/x/model.safetensors") for r in planted_server.requests)  # it was fetched
    leftovers = [p for p in (volume / "jobs").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert leftovers == [], leftovers  # removed on the failure path

    # Even if such a folder were there (an older worker, a kill -9): it is never a base model.
    planted = volume / "jobs" / ".plant.init-adapter" / "adapter"
    planted.mkdir(parents=True)
    for name, body in planted_server.files.items():
        (planted / name.split("/")[-1]).write_bytes(body)
    second = handler.handler({"id": "use", "input": small_job(job_id="use", base_model=str(planted))})
    assert second["error"].startswith("input: base_model path"), second
    assert "not allowed" in second["error"] or "outside the allowed folders" in second["error"]


@pytest.mark.parametrize("owned", ["jobs", "checkpoints", "artifacts"])
def test_base_model_never_points_into_the_workers_own_folders(volume, owned, monkeypatch):
    folder = volume / owned / "victim"
    shutil.copytree(volume / "models" / "tiny-llama", folder)
    output = handler.handler({"id": "j", "input": small_job(job_id="j", base_model=str(folder))})
    assert output["error"].startswith("input: base_model path"), output
    # Nor when the models root is the volume itself, so that those folders sit under it.
    monkeypatch.setenv("MODELS_DIR", str(volume))
    handler.get_settings.cache_clear()
    for ref in (str(folder), f"{owned}/victim"):
        output = handler.handler({"id": "j", "input": small_job(job_id="j", base_model=ref)})
        assert output["error"].startswith("input: base_model"), (ref, output)
        assert "worker's own" in output["error"], output


def test_a_dataset_repo_in_the_hub_cache_is_not_a_base_model(volume, monkeypatch):
    """hf:// datasets land in the same cache: a dataset repo's snapshot claims nothing."""
    snapshot = volume / "huggingface-cache" / "hub" / "datasets--evil--data" / "snapshots" / ("b" * 40)
    shutil.copytree(volume / "models" / "tiny-llama", snapshot)
    (snapshot / MARKER_NAME).write_text(json.dumps({"repo_id": EVIL_ID}))
    output = handler.handler({"id": "j", "input": small_job(job_id="j", base_model=str(snapshot))})
    assert output["error"].startswith("input: base_model path"), output


def test_a_marker_never_grants_remote_code_or_overrides_the_cache_identity(volume, monkeypatch):
    """A folder's own .worker-model.json cannot claim a trusted repo id."""
    holder = volume / "models" / "innocent"
    shutil.copytree(volume / "models" / "tiny-llama", holder)
    config = json.loads((holder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (holder / "config.json").write_text(json.dumps(config))
    (holder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (holder / MARKER_NAME).write_text(json.dumps({"repo_id": EVIL_ID}))
    monkeypatch.setenv("TRUST_REMOTE_CODE_MODELS", EVIL_ID)
    handler.get_settings.cache_clear()
    output = handler.handler({"id": "j", "input": small_job(job_id="j", base_model="innocent",
                                                            action="validate")})
    assert output["error"].startswith("model: "), output
    assert "TRUST_REMOTE_CODE_MODELS" in output["error"]

    # A snapshot in the Hub cache is what its path says, whatever its marker claims.
    snapshot = volume / "huggingface-cache" / "hub" / "models--acme--tiny" / "snapshots" / ("c" * 40)
    shutil.copytree(volume / "models" / "tiny-llama", snapshot)
    (snapshot / MARKER_NAME).write_text(json.dumps({"repo_id": EVIL_ID, "revision": "d" * 40}))
    output = handler.handler({"id": "j", "input": small_job(job_id="j", base_model=str(snapshot),
                                                            action="validate")})
    assert output.get("status") == "valid", output
    assert output["base_model"]["id"] == "acme/tiny" and output["base_model"]["revision"] == "c" * 40
