"""model_resolver (first cut): volume folders, absolute paths, MODEL_PATH — and never the wrong model."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from config.settings import WorkerSettings
from errors import InputError, ModelError
from model_resolver import resolve_model
from models.signature import MARKER_NAME


def test_folder_name_under_models_dir(settings):
    resolved = resolve_model("tiny-llama", None, settings)
    assert resolved.source == "volume"
    assert resolved.id == "tiny-llama"
    assert resolved.path == (settings.models_root / "tiny-llama").resolve()
    assert resolved.fingerprint.startswith("sha256:") and len(resolved.fingerprint) == 71
    assert resolved.signature.model_type == "llama"
    assert resolved.signature.fields["num_hidden_layers"] == 2


def test_org_name_layout_gives_the_repo_id(settings):
    shutil.copytree(settings.models_root / "tiny-llama", settings.models_root / "acme" / "tiny")
    resolved = resolve_model("acme/tiny", None, settings)
    assert (resolved.id, resolved.source) == ("acme/tiny", "volume")


def test_absolute_path_inside_the_volume(settings):
    path = str(settings.models_root / "tiny-llama")
    resolved = resolve_model(path, None, settings)
    assert resolved.source == "volume" and resolved.id == "tiny-llama"


@pytest.mark.parametrize("reference", ["/etc", "/tmp", "/"])
def test_absolute_path_outside_the_volume_is_refused(settings, reference):
    with pytest.raises(InputError, match="outside the allowed folders"):
        resolve_model(reference, None, settings)


def test_symlink_out_of_the_volume_is_refused(settings, tmp_path, tiny_llama):
    outside = tmp_path / "outside-model"
    shutil.copytree(tiny_llama, outside)
    os.symlink(outside, settings.models_root / "sneaky")
    with pytest.raises(InputError, match="links outside"):
        resolve_model("sneaky", None, settings)
    with pytest.raises(InputError, match="links outside"):
        resolve_model(str(settings.models_root / "sneaky"), None, settings)


def test_missing_model_names_where_it_looked(settings):
    with pytest.raises(ModelError) as info:
        resolve_model("acme/absent", None, settings)
    message = str(info.value)
    assert "'acme/absent' is not on this worker" in message
    assert str(settings.models_root / "acme" / "absent") in message and "huggingface-cache" in message
    assert "HF_HUB_OFFLINE is set" in message  # the suite runs offline: no download was attempted
    with pytest.raises(ModelError, match="not a Hugging Face repo id"):
        resolve_model("absent", None, settings)


def test_folder_without_config_is_not_a_model(settings):
    (settings.models_root / "half").mkdir()
    (settings.models_root / "half" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError):
        resolve_model(str(settings.models_root / "half"), None, settings)


def test_model_path_used_when_the_job_names_it_or_none(volume, monkeypatch):
    holder = volume / "pinned" / "acme" / "tiny"
    shutil.copytree(volume / "models" / "tiny-llama", holder)
    monkeypatch.setenv("MODEL_PATH", str(holder))
    settings = WorkerSettings()
    for requested in ("acme/tiny", None, str(holder)):
        resolved = resolve_model(requested, None, settings)
        assert resolved.source == "model_path", requested
        assert resolved.path == holder


def test_model_path_holding_another_model_is_never_used(volume, monkeypatch):
    holder = volume / "pinned" / "mistral-7b"
    shutil.copytree(volume / "models" / "tiny-llama", holder)
    (holder / MARKER_NAME).write_text(json.dumps({"repo_id": "mistralai/Mistral-7B-v0.1"}))
    monkeypatch.setenv("MODEL_PATH", str(holder))
    settings = WorkerSettings()
    with pytest.raises(ModelError) as info:
        resolve_model("Qwen/Qwen3-Next-80B-A3B-Instruct", None, settings)
    message = str(info.value)
    assert "Qwen/Qwen3-Next-80B-A3B-Instruct" in message and "mistralai/Mistral-7B-v0.1" in message
    assert "not used" in message
    assert resolve_model("mistralai/Mistral-7B-v0.1", None, settings).source == "model_path"


def test_default_base_model_and_missing_everything(volume, monkeypatch):
    with pytest.raises(InputError, match="base_model is missing"):
        resolve_model(None, None, WorkerSettings())
    monkeypatch.setenv("DEFAULT_BASE_MODEL", "tiny-llama")
    assert resolve_model(None, None, WorkerSettings()).id == "tiny-llama"


def test_remote_code_needs_the_allow_list(volume, monkeypatch):
    config_path = volume / "models" / "tiny-llama" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="TRUST_REMOTE_CODE_MODELS"):
        resolve_model("tiny-llama", None, WorkerSettings())
    monkeypatch.setenv("TRUST_REMOTE_CODE_MODELS", "other/x, tiny-llama")
    assert resolve_model("tiny-llama", None, WorkerSettings()).trust_remote_code is True


def test_recorded_revision_must_match_a_pin(settings):
    folder = settings.models_root / "tiny-llama"
    (folder / MARKER_NAME).write_text(json.dumps({"repo_id": "acme/tiny", "revision": "a" * 40}))
    assert resolve_model("tiny-llama", "aaaaaaa", settings).revision == "a" * 40
    with pytest.raises(ModelError, match="holds commit"):
        resolve_model("tiny-llama", "b" * 40, settings)


# --- the cache's folder names: one rule both ways ----------------------------------------------------

CACHE_NAMES = [
    ("acme/tiny-llama", "models--acme--tiny-llama"),
    ("gpt2", "models--gpt2"),
    ("my-org/my.model_v2", "models--my-org--my.model_v2"),
]


@pytest.mark.parametrize("repo_id, folder", CACHE_NAMES)
def test_cache_folder_names_round_trip(repo_id, folder):
    from models.cache import cache_folder_name, repo_id_of_cache_folder

    assert cache_folder_name(repo_id) == folder
    assert repo_id_of_cache_folder(folder) == repo_id
    assert cache_folder_name(repo_id, "dataset") == "datasets" + folder[len("models"):]


@pytest.mark.parametrize("repo_id", ["org/name--v2", "org--x/name", "a/b/c", "org/", "/name"])
def test_an_id_the_hub_refuses_has_no_cache_folder(repo_id):
    from models.cache import cache_folder_name

    assert cache_folder_name(repo_id) is None


@pytest.mark.parametrize("folder", ["models--org--name--v2", "datasets--org--name", "models--", "org--name"])
def test_a_folder_no_repo_id_makes_names_none(folder):
    from models.cache import repo_id_of_cache_folder

    assert repo_id_of_cache_folder(folder) is None


def test_the_signature_and_the_resolver_read_a_cache_folder_alike(settings, tmp_path):
    from model_resolver import _canonical_id
    from models.signature import read_signature

    commit = "c" * 40
    for repo_id, folder in CACHE_NAMES + [("org/name--v2", "models--org--name--v2")]:
        snapshot = tmp_path / "hub" / folder / "snapshots" / commit
        shutil.copytree(settings.models_root / "tiny-llama", snapshot)
        signature = read_signature(snapshot)
        if "--v2" in folder:  # not a folder the Hub could have made: neither claims an id for it
            assert signature.repo_id is None and _canonical_id(snapshot, settings) == snapshot.name
        else:
            assert (signature.repo_id, signature.commit) == (repo_id, commit)
            assert _canonical_id(snapshot, settings) == repo_id


def test_a_repo_id_the_hub_refuses_is_named_before_any_download(settings):
    with pytest.raises(ModelError) as info:
        resolve_model("acme/tiny--llama", None, settings)
    assert "'acme/tiny--llama' is not on this worker" in str(info.value)
    assert "it is not a valid Hugging Face repo id (the Hub allows no '--' in one)" in str(info.value)
