"""Base models from the Hugging Face Hub: download once into the volume's cache, then never again.

Every test talks to tests/hub_server.py, a local server that answers the Hub's HTTP API as
huggingface_hub expects, through the real client.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import handler
from config.settings import WorkerSettings
from errors import ModelError
from model_resolver import ModelNotCached, resolve_model
from models.cache import COMPLETE_DIR
from models.folder import check_model_folder
from models.signature import MARKER_NAME, read_signature
from storage.records import SqliteRecords
from tests.conftest import ROOT, small_job
from tests.hub_server import Cut


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def tiny_repo(hub, tiny_llama):
    return hub.add_repo("acme/tiny-llama", tiny_llama)


def resolve(repo_id="acme/tiny-llama", revision=None, **kwargs):
    return resolve_model(repo_id, revision, WorkerSettings(), **kwargs)


def test_download_into_the_volume_cache_then_hits_without_network(hub, tiny_repo, tiny_llama, volume):
    first = resolve()
    assert first.source == "download" and first.revision == tiny_repo.sha
    assert first.path == volume / "huggingface-cache" / "hub" / "models--acme--tiny-llama" / "snapshots" / tiny_repo.sha
    assert first.downloaded_bytes == sum(len(b) for b in tiny_repo.files.values())
    assert first.fingerprint == read_signature(tiny_llama).fingerprint
    assert (first.path.parent.parent / COMPLETE_DIR / f"{tiny_repo.sha}.json").is_file()
    assert files_of(first.path) == tiny_repo.files
    assert hub.count("GET", "/resolve/") == len(tiny_repo.files)

    before = len(hub.requests)
    second = resolve()
    assert (second.source, second.path, second.revision) == ("hf_cache", first.path, tiny_repo.sha)
    assert len(hub.requests) == before, "a cached model touched the network"
    hub.close()  # the Hub is down: cached models keep working
    assert resolve().source == "hf_cache"
    assert resolve(revision=tiny_repo.sha[:10]).source == "hf_cache"


def test_revision_pin_is_resolved_and_recorded(hub, tiny_repo, tiny_llama):
    old_sha = tiny_repo.sha
    files = dict(tiny_repo.files)
    files["config.json"] = files["config.json"].replace(b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 1e-05')
    hub.add_repo("acme/tiny-llama", files)  # a newer commit on main
    assert tiny_repo.sha != old_sha

    pinned = resolve(revision=old_sha)
    assert pinned.revision == old_sha and pinned.source == "download"
    assert files_of(pinned.path)["config.json"] == (tiny_llama / "config.json").read_bytes()
    latest = resolve(revision="main")
    assert latest.revision == tiny_repo.sha and latest.fingerprint != pinned.fingerprint
    before = len(hub.requests)
    assert resolve(revision=old_sha).source == "hf_cache" and resolve(revision="main").source == "hf_cache"
    assert len(hub.requests) == before
    with pytest.raises(ModelError, match="revision 'v9' of acme/tiny-llama does not exist"):
        resolve(revision="v9")


def test_gated_repo_needs_a_token(hub, tiny_llama, monkeypatch):
    hub.add_repo("acme/gated", tiny_llama, gated=True)
    with pytest.raises(ModelError) as info:
        resolve("acme/gated")
    assert "acme/gated is a gated model and HF_TOKEN is not set" in str(info.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrongwrongwrong")
    with pytest.raises(ModelError) as info:
        resolve("acme/gated")
    assert "has no access" in str(info.value) and "hf_wrong" not in str(info.value)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert resolve("acme/gated").source == "download"


def test_missing_repo_is_a_clear_error(hub):
    with pytest.raises(ModelError) as info:
        resolve("acme/nothing-here")
    message = str(info.value)
    assert "'acme/nothing-here' is not on this worker" in message
    assert "acme/nothing-here was not found on the Hugging Face Hub" in message


def test_a_cut_download_is_never_loaded_and_a_rerun_resumes(hub, tiny_repo, tiny_llama):
    hub.cuts.append(Cut("model.safetensors", after_bytes=4096, times=-1))
    with pytest.raises(ModelError) as info:
        resolve()
    assert info.value.retryable and "a re-run resumes it" in info.value.message
    with pytest.raises(ModelNotCached):  # what was fetched is not a model
        resolve(download=False)
    snapshot = tiny_repo and (WorkerSettings().hf_cache_root / "hub" / "models--acme--tiny-llama")
    assert not (snapshot / COMPLETE_DIR).exists()

    hub.cuts.clear()
    done = resolve()
    assert done.source == "download" and check_model_folder(done.path) == []
    assert files_of(done.path) == tiny_repo.files


def test_a_truncated_cached_shard_is_not_used(hub, tiny_repo):
    first = resolve()
    blob = (first.path / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    (first.path.parent.parent / COMPLETE_DIR / f"{tiny_repo.sha}.json").unlink()
    assert any("truncated" in p for p in check_model_folder(first.path))
    with pytest.raises(ModelNotCached):
        resolve(download=False)


def test_runpod_cache_layout_without_our_marker_is_used_offline(hub, tiny_repo, volume):
    from huggingface_hub import snapshot_download

    # What RunPod's cached models (or a user's own snapshot_download) leave on the volume.
    snapshot_download("acme/tiny-llama", cache_dir=str(volume / "huggingface-cache" / "hub"), endpoint=hub.url)
    before = len(hub.requests)
    resolved = resolve()
    assert resolved.source == "hf_cache" and resolved.revision == tiny_repo.sha
    assert len(hub.requests) == before


def test_only_what_loading_needs_is_downloaded(hub, tiny_llama):
    files = files_of(tiny_llama)
    files.update({"pytorch_model.bin": b"pickle" * 100, "original/consolidated.safetensors": b"x" * 100,
                  "README.md": b"# card", "onnx/model.onnx": b"onnx"})
    hub.add_repo("acme/many", files)
    resolved = resolve("acme/many")
    got = set(files_of(resolved.path))
    assert got == set(files_of(tiny_llama))
    assert hub.count("GET", "pytorch_model.bin") == 0 and hub.count("GET", "consolidated") == 0


def test_pickle_only_repo_needs_an_explicit_opt_in(hub, tiny_llama, monkeypatch):
    files = {k: v for k, v in files_of(tiny_llama).items() if k != "model.safetensors"}
    files["pytorch_model.bin"] = b"not really a pickle"
    hub.add_repo("acme/pickles", files)
    with pytest.raises(ModelError, match="only pickle weights .*ALLOW_PICKLE_WEIGHTS"):
        resolve("acme/pickles")
    assert hub.count("GET", "pytorch_model.bin") == 0
    monkeypatch.setenv("ALLOW_PICKLE_WEIGHTS", "true")
    assert "pytorch_model.bin" in files_of(resolve("acme/pickles").path)


def test_remote_code_is_refused_before_any_weight_is_fetched(hub, tiny_llama):
    files = files_of(tiny_llama)
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "modeling.Model"}
    files["config.json"] = json.dumps(config).encode()
    files["modeling.py"] = b"import os"
    hub.add_repo("acme/custom", files)
    with pytest.raises(ModelError, match="TRUST_REMOTE_CODE_MODELS"):
        resolve("acme/custom")
    assert hub.count("GET", "model.safetensors") == 0 and hub.count("GET", "modeling.py") == 0


def test_free_disk_is_checked_before_downloading(hub, tiny_repo, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ModelError, match=r"needs 0\.0 GB but .* has 0\.0 GB free"):
        resolve()
    assert hub.count("GET", "model.safetensors") == 0


def test_model_path_holding_another_model_is_not_used_even_when_the_hub_has_the_model(
        hub, tiny_repo, volume, monkeypatch):
    holder = volume / "pinned"
    (volume / "models" / "tiny-llama").rename(holder)
    (holder / MARKER_NAME).write_text(json.dumps({"repo_id": "mistralai/Mistral-7B-v0.1"}))
    monkeypatch.setenv("MODEL_PATH", str(holder))
    resolved = resolve()
    assert resolved.source == "download" and resolved.id == "acme/tiny-llama"


def test_train_job_downloads_and_records_the_commit(hub, tiny_repo, volume, monkeypatch):
    monkeypatch.setenv("GPU_HOURLY_USD", "3.0")
    output = handler.handler({"id": "dl-job", "input": small_job(base_model="acme/tiny-llama")})
    assert output["status"] == "succeeded", output
    assert output["base_model"]["source"] == "download" and output["base_model"]["revision"] == tiny_repo.sha
    assert output["base_model"]["downloaded_bytes"] > 0
    assert output["cost"]["resolve_usd"] > 0 and output["cost"]["train_usd"] > 0
    adapter_dir = Path(output["adapter"]["uri"].removeprefix("file://"))
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    assert manifest["base_model"]["revision"] == tiny_repo.sha
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-llama" and config["revision"] == tiny_repo.sha
    assert SqliteRecords(volume / "records.sqlite3").get_artifact("dl-job")["base_model_revision"] == tiny_repo.sha

    again = handler.handler({"id": "dl-job-2", "input": small_job(base_model="acme/tiny-llama")})
    assert again["base_model"]["source"] == "hf_cache" and again["base_model"]["downloaded_bytes"] == 0


def test_bad_dataset_fails_before_the_download(hub, tiny_repo):
    output = handler.handler({"id": "x", "input": small_job(base_model="acme/tiny-llama",
                                                            dataset={"uri": "datasets/missing.jsonl"})})
    assert output["error"].startswith("dataset: ")
    assert hub.count("GET", "model.safetensors") == 0


def test_validate_fetches_the_tokenizer_not_the_weights(hub, tiny_repo):
    output = handler.handler({"id": "v", "input": small_job(action="validate", base_model="acme/tiny-llama")})
    assert output["status"] == "valid", output
    assert output["base_model"]["source"] == "hub_metadata" and output["base_model"]["revision"] == tiny_repo.sha
    assert output["dataset"]["examples"] == 32
    assert hub.count("GET", "model.safetensors") == 0


def test_prefetch_action_reports_what_it_downloaded(hub, tiny_repo, volume):
    output = handler.handler({"id": "pf", "input": {"action": "prefetch", "base_model": "acme/tiny-llama"}})
    assert output["status"] == "cached"
    assert output["base_model"]["source"] == "download" and output["bytes"] > 0
    assert output["base_model"]["path"].startswith(str(volume / "huggingface-cache"))
    again = handler.handler({"id": "pf2", "input": {"action": "prefetch", "base_model": "acme/tiny-llama"}})
    assert again["base_model"]["source"] == "hf_cache" and again["base_model"]["downloaded_bytes"] == 0


@pytest.mark.slow
def test_four_workers_prefetching_at_once_download_once(hub, tiny_repo, volume):
    env = {**os.environ, "VOLUME_ROOT": str(volume), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "cli.py", "prefetch", "acme/tiny-llama"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out))
    gets = Counter(path.rsplit("/", 1)[-1] for method, path in hub.requests
                   if method == "GET" and "/resolve/" in path)
    assert gets and all(n == 1 for n in gets.values()), gets
    assert sorted(o["base_model"]["source"] for o in outputs).count("download") == 1
    paths = {o["base_model"]["path"] for o in outputs}
    assert len(paths) == 1
    folder = Path(paths.pop())
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files_of(folder).items()}
    assert digests == {name: hashlib.sha256(data).hexdigest() for name, data in tiny_repo.files.items()}


def test_a_held_lock_makes_others_wait_with_a_log_line_then_give_up(settings, caplog):
    import logging

    from models.hub import RepoLock

    path = settings.hf_cache_root / "hub" / ".locks" / "worker" / "models--acme--x.lock"
    with RepoLock(path, "acme/x", timeout_s=5):
        with caplog.at_level(logging.INFO, logger="model_resolver"):
            with pytest.raises(ModelError) as info:
                with RepoLock(path, "acme/x", timeout_s=0.6, log_every_s=0.2):
                    pass
    assert "waited 1s for another worker to finish downloading acme/x" in str(info.value)
    assert info.value.retryable
    assert any("waiting for another worker downloading acme/x" in r.getMessage() for r in caplog.records)
    with RepoLock(path, "acme/x", timeout_s=1):  # released: the next one gets it at once
        pass
