"""handler.py end to end: in-process, through --test_input, and through --rp_serve_api."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import handler
from adapters.manifest import read_manifest
from files import verify_files
from storage.records import SqliteRecords
from tests.conftest import ROOT, small_job


def _path(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


def test_train_job_end_to_end(volume, monkeypatch):
    monkeypatch.setenv("GPU_HOURLY_USD", "2.5")
    sent = []
    monkeypatch.setattr(handler, "_runpod_notify", lambda job: sent.append)
    output = handler.handler({"id": "rp-123", "input": small_job(job_id="job-e2e", output={"prefix": "team-a"})})

    assert output["status"] == "succeeded", output
    assert output["job_id"] == "job-e2e"
    base = output["base_model"]
    assert (base["id"], base["source"]) == ("tiny-llama", "volume")
    assert base["fingerprint"].startswith("sha256:")
    assert set(output["timings"]) >= {"resolve_s", "dataset_s", "load_s", "train_s", "save_s", "upload_s",
                                      "record_s", "total_s"}
    assert output["cost"]["gpu_hourly_usd"] == 2.5 and output["cost"]["estimated_usd"] > 0
    metrics = output["metrics"]
    assert metrics["steps"] == 8 and metrics["last_loss"] < metrics["first_loss"]
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_second"] > 0

    # The artifact layout (CONTRACT §4), complete and intact.
    adapter_dir = _path(output["adapter"]["uri"])
    assert adapter_dir == volume / "artifacts" / "team-a" / "job-e2e" / "adapter"
    job_dir = adapter_dir.parent
    names = {f["name"] for f in output["adapter"]["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names
    for name in ("manifest.json", "metrics.json", "loss.png", "train_log.jsonl"):
        assert (job_dir / name).is_file(), name
    manifest = read_manifest(adapter_dir)
    assert verify_files(adapter_dir, manifest) == []
    assert verify_files(job_dir, read_manifest(job_dir)) == []
    assert manifest["base_model"]["fingerprint"] == base["fingerprint"]
    assert manifest["base_model"]["architecture"]["model_type"] == "llama"
    assert manifest["peft"]["target_modules"] == output["lora"]["target_modules"]
    assert manifest["dataset"]["examples"] == 32 and len(manifest["dataset"]["sha256"]) == 64
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft"}
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert "tiny-llama" in (adapter_dir / "README.md").read_text()
    assert (job_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (volume / "jobs" / "job-e2e").exists(), "scratch copy left behind"

    # The records: one job row that finished, one artifact row that points at the adapter.
    records = SqliteRecords(volume / "records.sqlite3")
    job_row = records.get_job("job-e2e")
    assert (job_row["status"], job_row["progress"], job_row["error"]) == ("succeeded", 1.0, None)
    assert job_row["current_step"] == 8 and job_row["total_steps"] == 8 and job_row["last_loss"] is not None
    assert job_row["output"] == output and job_row["finished_at"]
    artifact = records.get_artifact("job-e2e")
    assert artifact["id"] == output["record_id"]
    assert artifact["uri"] == output["adapter"]["uri"]
    assert artifact["base_model_fingerprint"] == base["fingerprint"]
    assert artifact["manifest"]["files"] == manifest["files"]

    # Progress went to RunPod: each stage, and training steps with step/total/loss.
    stages = [u["stage"] for u in sent]
    assert stages[0] == "model" and {"dataset", "train", "save", "upload", "record"} <= set(stages)
    steps = [u for u in sent if "step" in u]
    assert steps and steps[-1]["step"] == steps[-1]["total_steps"] == 8 and "loss" in steps[-1]
    assert all(0 <= u["progress"] <= 1 for u in sent)


def test_adapter_loads_onto_the_base(volume):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = handler.handler({"id": "load-me", "input": small_job()})
    base = AutoModelForCausalLM.from_pretrained(volume / "models" / "tiny-llama")
    model = PeftModel.from_pretrained(base, str(_path(output["adapter"]["uri"])))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 4


BAD_INPUTS = [
    ("unknown key", small_job(hyperparameter={"lora_r": 8}), "input: unknown key 'hyperparameter'; did you mean 'hyperparameters'?"),
    ("rank out of range", small_job(hyperparameters={"lora_r": 4096}), "input: hyperparameters.lora_r: should be less than or equal to 1024; got 4096"),
    ("missing model", small_job(base_model="acme/not-there"), "model: base model 'acme/not-there' is not on this worker (looked in: "),
    ("missing folder", small_job(base_model="not-there"), "model: base model 'not-there' is not on this worker (looked in: "),
    ("missing dataset", small_job(dataset={"uri": "datasets/absent.jsonl"}), "dataset: dataset file datasets/absent.jsonl does not exist"),
    ("no dataset at all", {"base_model": "tiny-llama"}, "input: action 'train' needs a 'dataset'"),
    ("not an object", "train please", "input: the job input must be a JSON object; got str"),
]


@pytest.mark.parametrize("name,payload,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_fast_before_any_weight_loads(volume, monkeypatch, name, payload, expected):
    import train_lora

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for a bad input")

    monkeypatch.setattr(train_lora, "load_base_model", no_loading)
    started = time.monotonic()
    output = handler.handler({"id": "bad-1", "input": payload})
    elapsed = time.monotonic() - started
    assert output == {"error": output["error"]} and output["error"].startswith(expected), output
    assert elapsed < 1.0, f"{elapsed:.2f}s"


def test_failed_job_row_records_the_error(volume):
    output = handler.handler({"id": "fails", "input": small_job(base_model="acme/not-there")})
    row = SqliteRecords(volume / "records.sqlite3").get_job("fails")
    assert row["status"] == "failed" and row["error"] == output["error"] and row["stage"] == "model"


def test_secrets_never_reach_the_error(volume, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz012345")
    uri = "datasets/missing.jsonl"
    output = handler.handler({"id": "s", "input": small_job(dataset={"uri": uri})})
    assert "hf_abcdefghijklmnopqrstuvwxyz012345" not in json.dumps(output)
    bad = handler.handler({"id": "s2", "input": small_job(
        dataset={"uri": "https://x.supabase.co/storage/v1/object/sign/d.jsonl?token=eyJabc.def.ghi"})})
    assert "token=" not in bad["error"] and "eyJabc" not in bad["error"]


def test_half_configured_s3_is_an_upload_error(volume, monkeypatch):
    monkeypatch.setenv("S3_BUCKET", "adapters")
    output = handler.handler({"id": "s3", "input": small_job()})
    assert output["error"].startswith("upload: worker settings: S3 is half-configured: set AWS_ACCESS_KEY_ID")


def _env(volume: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("MODEL_PATH", "DEFAULT_BASE_MODEL")}
    env.update(VOLUME_ROOT=str(volume), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_test_input_subprocess(volume):
    job = {"input": small_job(job_id="cli-job")}
    proc = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(job)], cwd=ROOT,
                          env=_env(volume), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "completed successfully" in proc.stdout + proc.stderr
    assert (volume / "artifacts" / "cli-job" / "adapter" / "manifest.json").is_file()

    bad = subprocess.run([sys.executable, "handler.py", "--test_input",
                          json.dumps({"input": small_job(hyperparameters={"lora_r": 0})})],
                         cwd=ROOT, env=_env(volume), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "input: hyperparameters.lora_r: should be greater than or equal to 1; got 0" in bad.stdout + bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rp_serve_api_runsync(volume, tmp_path):
    port = _free_port()
    log = open(tmp_path / "api.log", "w")
    proc = subprocess.Popen([sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port),
                             "--rp_api_host", "127.0.0.1"], cwd=ROOT, env=_env(volume),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/docs", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()
                time.sleep(0.5)
        reply = requests.post(f"http://127.0.0.1:{port}/runsync", json={"input": small_job()}, timeout=300)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "COMPLETED", body
        assert body["output"]["status"] == "succeeded"
        assert body["output"]["job_id"] == body["id"]  # RunPod's id becomes the job_id
        assert _path(body["output"]["adapter"]["uri"]).is_dir()

        failed = requests.post(f"http://127.0.0.1:{port}/runsync",
                               json={"input": small_job(base_model="acme/nope")}, timeout=60).json()
        assert failed["status"] == "FAILED" and failed["error"].startswith("model: ")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_validate_action_loads_no_weights_and_writes_no_record(volume, monkeypatch):
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    output = handler.handler({"id": "val-1", "input": small_job(action="validate")})
    assert output["status"] == "valid" and output["job_id"] == "val-1"
    assert output["base_model"]["id"] == "tiny-llama"
    report = output["dataset"]
    assert report["examples"] == 32 and report["tokens"] > report["trained_tokens"] > 0
    assert report["formats"] == {"chat": 32} and len(report["sha256"]) == 64
    assert SqliteRecords(volume / "records.sqlite3").get_job("val-1") is None


def test_prefetch_of_a_volume_model_reports_it_cached(volume):
    output = handler.handler({"id": "pf", "input": {"action": "prefetch", "base_model": "tiny-llama"}})
    assert output["status"] == "cached" and output["base_model"]["source"] == "volume"
    assert output["bytes"] > 0


def test_selftest_reports_every_check(volume):
    output = handler.handler({"id": "st", "input": {"action": "selftest"}})
    assert output["status"] == "passed", output
    names = [c["name"] for c in output["checks"]]
    assert names == ["volume", "model loading", "dataset loading", "training", "adapter saving", "upload",
                     "artifact row"]
    assert all(c["passed"] is True and c["seconds"] >= 0 and c["detail"] for c in output["checks"])
    row = SqliteRecords(volume / "records.sqlite3").get_artifact(output["job_id"])
    assert row is not None and row["uri"].startswith("file://")


def test_selftest_names_the_failing_step(volume, monkeypatch):
    def broken_store(settings):
        class Broken:
            def claim(self, prefix, job_id):
                return None

            def put(self, job_dir, prefix, job_id):
                from errors import StorageError
                raise StorageError("the bucket refused the upload (AccessDenied)")

            def find_complete(self, prefix, job_id):
                return None
        return Broken()

    import pipeline
    monkeypatch.setattr(pipeline, "open_artifact_store", broken_store)
    output = handler.handler({"id": "st2", "input": {"action": "selftest"}})
    assert output["status"] == "failed"
    by_name = {c["name"]: c for c in output["checks"]}
    assert by_name["training"]["passed"] is True
    assert by_name["upload"]["passed"] is False and "AccessDenied" in by_name["upload"]["detail"]
    assert "kept at" in by_name["upload"]["detail"]
    assert by_name["artifact row"]["passed"] is None
