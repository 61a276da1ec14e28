"""Shared fixtures: tiny models built from configs (once per session) and a fresh volume per test.

Everything is offline: HF_HUB_OFFLINE=1, no hub, no weights from anywhere but ``save_pretrained``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from config.settings import WorkerSettings  # noqa: E402
from demo.tiny_models import build_tiny_model, chat_corpus  # noqa: E402

DEMO_DATA = ROOT / "demo" / "data" / "capitals.jsonl"


def worker_env_names() -> set[str]:
    """Every environment variable WorkerSettings reads, so tests start from none of them."""
    names = set()
    for name, field in WorkerSettings.model_fields.items():
        names.add(name.upper())
        alias = field.validation_alias
        for choice in getattr(alias, "choices", []) or []:
            names.add(str(choice).upper())
    return names | {"HF_HOME"}


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """build(family) → the folder of a tiny saved model of that family, built once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    corpus = chat_corpus(DEMO_DATA)

    def build(family: str = "llama", **kwargs) -> Path:
        suffix = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
        return build_tiny_model(root / f"{family}{'-' + suffix if suffix else ''}", family=family,
                                corpus=corpus, **kwargs)

    return build


@pytest.fixture(scope="session")
def tiny_llama(model_factory) -> Path:
    return model_factory("llama")


@pytest.fixture
def volume(tmp_path, tiny_llama, monkeypatch) -> Path:
    """A fresh volume with the tiny Llama at models/tiny-llama and the demo data at datasets/."""
    vol = tmp_path / "volume"
    shutil.copytree(tiny_llama, vol / "models" / "tiny-llama")
    (vol / "datasets").mkdir(parents=True)
    shutil.copyfile(DEMO_DATA, vol / "datasets" / "capitals.jsonl")
    for name in worker_env_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VOLUME_ROOT", str(vol))
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "0")

    import handler

    handler.get_settings.cache_clear()
    yield vol
    handler.get_settings.cache_clear()


@pytest.fixture
def settings(volume) -> WorkerSettings:
    return WorkerSettings()


def small_job(**overrides) -> dict:
    """A job input that trains the tiny Llama in a couple of seconds."""
    job = {
        "base_model": "tiny-llama",
        "dataset": {"uri": "datasets/capitals.jsonl", "max_examples": 32},
        "hyperparameters": {
            "epochs": 2, "learning_rate": 5e-3, "batch_size": 8, "gradient_accumulation_steps": 1,
            "max_seq_length": 128, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "logging_steps": 1,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the whole session; see tests/services.py."""
    from tests.services import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket per test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def hub(volume, monkeypatch):
    """A local Hugging Face Hub (tests/hub_server.py); the worker's HF_ENDPOINT points at it.

    The suite runs with HF_HUB_OFFLINE=1; tests that use this fixture go online, to it alone.
    """
    import huggingface_hub.constants

    from tests.hub_server import HubServer

    server = HubServer()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    import handler

    handler.get_settings.cache_clear()
    yield server
    server.close()


@pytest.fixture(scope="session")
def trained_adapter(model_factory, tmp_path_factory):
    """train(family, **model_kwargs) → (adapter folder, base folder): a tiny job through
    ``handler.handler`` on that family's tiny model, so the adapter carries the worker's manifest.
    Each (family, kwargs) trains once per session, on a volume of its own."""
    import tempfile

    import handler

    root = tmp_path_factory.mktemp("trained-adapters")
    cache: dict = {}

    def train(family: str = "llama", **kwargs) -> tuple[Path, Path]:
        key = (family, tuple(sorted(kwargs.items())))
        if key in cache:
            return cache[key]
        model = model_factory(family, **kwargs)
        vol = Path(tempfile.mkdtemp(prefix=f"volume-{model.name}-", dir=root))
        shutil.copytree(model, vol / "models" / model.name)
        (vol / "datasets").mkdir(parents=True)
        shutil.copyfile(DEMO_DATA, vol / "datasets" / "capitals.jsonl")
        with pytest.MonkeyPatch.context() as mp:
            for name in worker_env_names():
                mp.delenv(name, raising=False)
            mp.setenv("VOLUME_ROOT", str(vol))
            handler.get_settings.cache_clear()
            try:
                output = handler.handler({"id": "adapter", "input": small_job(
                    base_model=model.name, job_id=f"adapter-{model.name}")})
            finally:
                handler.get_settings.cache_clear()
        assert "error" not in output, output
        cache[key] = (Path(output["adapter"]["uri"].removeprefix("file://")), vol / "models" / model.name)
        return cache[key]

    return train


@pytest.fixture(scope="session")
def shared_s3_bucket(s3_server) -> str:
    """One bucket for the adapter tests that write to S3, each test under a prefix of its own."""
    import uuid

    bucket = f"adapter-tests-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL on loopback for the whole session (tests/services.py). Missing PostgreSQL
    skips the test on a workstation and fails it in CI (CI=true), where scripts/test.sh installs it."""
    from tests.services import PostgresMissing, start_postgres

    try:
        server = start_postgres()
    except PostgresMissing as exc:
        if _ci():
            pytest.fail(f"CI=true and {exc}")
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def postgres_db(postgres_server, request) -> str:
    """A fresh, empty database per test; its connection string."""
    import re
    import uuid

    import psycopg

    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.dsn(name)


def assert_adapter_reloads_identically(model, model_dir: Path, adapter_dir: Path, tokenizer) -> None:
    """The saved adapter, loaded onto a fresh base, gives the trained model's logits; the base alone differs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.peft_setup import targets_as_written

    ids = tokenizer("The capital of Peru is Lima.", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        trained = model(**ids).logits
        with targets_as_written():  # the worker's adapters name shared-expert layers by path
            reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                                 str(adapter_dir)).eval()(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(**ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, trained, atol=1e-3), "the adapter changed nothing"
