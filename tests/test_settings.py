"""WorkerSettings (CONTRACT §3): defaults, aliases, and no silent fallback when half-configured."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from config.settings import WorkerSettings


def test_defaults_follow_the_volume(volume):
    s = WorkerSettings()
    assert s.volume_root == volume
    assert s.models_root == volume / "models"
    assert s.hf_cache_root == volume / "huggingface-cache"
    assert s.records_path == volume / "records.sqlite3"
    assert s.artifacts_root == volume / "artifacts"
    assert s.s3_bucket is None and s.supabase_url is None and s.gpu_hourly_usd is None


def test_runpod_bucket_variables_are_accepted(volume, monkeypatch):
    monkeypatch.setenv("S3_BUCKET", "b")
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "secret-value")
    s = WorkerSettings()
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    assert s.aws_secret_access_key.get_secret_value() == "secret-value"
    assert "secret-value" not in repr(s)
    assert "secret-value" in s.secret_values()


@pytest.mark.parametrize("env,missing", [
    ({"S3_BUCKET": "b"}, "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"),
    ({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}, "S3_BUCKET"),
    ({"SUPABASE_URL": "http://x"}, "SUPABASE_SERVICE_ROLE_KEY"),
])
def test_half_configured_is_an_error(volume, monkeypatch, env, missing):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        WorkerSettings()
    assert missing in str(info.value) and "half-configured" in str(info.value)


def test_empty_variables_mean_unset_and_lists_split(volume, monkeypatch):
    monkeypatch.setenv("MODEL_PATH", "")
    monkeypatch.setenv("GPU_HOURLY_USD", "")
    monkeypatch.setenv("TRUST_REMOTE_CODE_MODELS", "a/b, c/d,")
    s = WorkerSettings()
    assert s.model_path is None and s.gpu_hourly_usd is None
    assert s.trust_remote_code_models == ["a/b", "c/d"]


@pytest.mark.parametrize("env,group", [
    ({"S3_BUCKET": "b"}, "s3"),
    ({"SUPABASE_URL": "http://x"}, "supabase"),
    ({"PRESIGN_SECONDS": "soon"}, "s3"),  # a variable of the S3 group, failing on its own
    ({"MAX_TRAIN_SECONDS": "S3"}, None),  # "S3" in the text only: not the S3 group
])
def test_a_settings_error_names_its_group_from_what_failed(volume, monkeypatch, env, group):
    from config.settings import settings_error_group

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        WorkerSettings()
    assert settings_error_group(info.value) == group
