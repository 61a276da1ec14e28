"""The job output, both manifest.json files and both records keep their JSON for existing consumers.

tests/fixtures/golden/ holds what the worker produced for one small job before the manifest became a
typed object (tests/fixtures/golden/README.md says how it was captured). The same job run now must give
the same keys in the same order at every level, the same JSON types, and the same values, except for
what differs from run to run by nature; ``VOLATILE`` lists that, and nothing else is normalized.
The output, the artifact row and the manifests must also visibly come from one manifest object.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import handler
from adapters.manifest import AdapterManifest, render_model_card
from pipeline import _artifact_record, _train_output
from storage.artifacts import StoredArtifact
from storage.records import ARTIFACT_COLUMNS, JOB_COLUMNS, JobUpdate, SqliteRecords
from tests.conftest import small_job

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
DOCUMENTS = ("output", "adapter_manifest", "job_manifest", "artifact_row", "job_row")

# Dotted paths (list items as numbers) whose values differ from run to run: only their JSON type is kept.
VOLATILE = re.compile("|".join((
    r"(^|\.)(created_at|updated_at|started_at|finished_at|download_expires_at)$",  # clocks
    r"^(id|record_id)$|^output\.record_id$",  # random row ids (their agreement is checked below)
    r"(^|\.)timings\.\w+$",
    r"(^|\.)(seconds|stage_seconds|tokens_per_second)$",  # timings inside the manifest
    r"(^|\.)versions\.\w+$",  # whatever is installed
    r"(^|\.)memory_plan\.(device_bytes\.\d+|available_bytes|gib\.available_bytes)$",  # this machine's free memory
    r"^bytes$|(^|\.)adapter\.bytes$",  # the adapter's size: its model card prints the losses (see below)
)))
# Losses: equal within LOSS_TOLERANCE (training on another CPU may round differently).
LOSSES = re.compile(r"(^|\.)(train_loss|first_loss|last_loss|eval_loss)$")
LOSS_TOLERANCE = 1e-3
# Files whose bytes differ from run to run: those that embed clocks and durations; peft's
# adapter_config.json, which lists target_modules from a set (in PYTHONHASHSEED's order); and those
# that hold what training computed (the weights; the model card, which prints the losses), since
# another CPU may round differently. The model card is checked byte for byte from the golden manifest.
VARYING_FILES = re.compile(r"^(adapter/)?(manifest\.json|adapter_config\.json|adapter_model\.safetensors|"
                           r"README\.md)$|^metrics\.json$|^train_log\.jsonl$|^loss\.png$|"
                           r"^tensorboard/events\.out\.tfevents\.")
TENSORBOARD_NAME = re.compile(r"events\.out\.tfevents\.[^\"/]+")


def _json_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def normalize(doc: Any, volume: str, path: str = "", losses: dict | None = None) -> Any:
    """``doc`` with the volume folder as <volume>, volatile values as <their JSON type>, losses set
    aside in ``losses`` (path → value), and the bytes/sha256 of varying files as <their JSON type>."""
    if isinstance(doc, dict):
        varying = set(doc) == {"name", "bytes", "sha256"} and VARYING_FILES.search(doc["name"])
        return {k: (f"<{_json_type(v)}>" if varying and k != "name" else
                    normalize(v, volume, f"{path}.{k}".lstrip("."), losses)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [normalize(v, volume, f"{path}.{i}".lstrip("."), losses) for i, v in enumerate(doc)]
    if VOLATILE.search(path):
        return f"<{_json_type(doc)}>"
    if LOSSES.search(path) and isinstance(doc, float):
        losses[path] = doc
        return "<float>"
    if isinstance(doc, str):
        return TENSORBOARD_NAME.sub("events.out.tfevents.<stamp>", doc.replace(volume, "<volume>"))
    return doc


def assert_same_json(golden: Any, actual: Any, path: str = "") -> None:
    """Same key order at every level, the same JSON types, the same values; failures name the path."""
    where = path or "<root>"
    assert _json_type(actual) == _json_type(golden), f"{where}: {_json_type(actual)}, was {_json_type(golden)}"
    if isinstance(golden, dict):
        assert list(actual) == list(golden), f"{where}: keys {list(actual)}, were {list(golden)}"
        for key in golden:
            assert_same_json(golden[key], actual[key], f"{path}.{key}".lstrip("."))
    elif isinstance(golden, list):
        assert len(actual) == len(golden), f"{path}: {len(actual)} items, were {len(golden)}"
        for i, (g, a) in enumerate(zip(golden, actual)):
            assert_same_json(g, a, f"{path}.{i}".lstrip("."))
    else:
        assert actual == golden, f"{path}: {actual!r}, was {golden!r}"


def _produce(volume: Path) -> dict[str, Any]:
    output = handler.handler({"id": "x", "input": small_job(
        job_id="golden", output={"prefix": "adapters/team"}, metadata={"user_id": "u1"})})
    assert "error" not in output, output
    adapter = Path(output["adapter"]["uri"].removeprefix("file://"))
    records = SqliteRecords(volume / "records.sqlite3")
    return {
        "output": json.loads(json.dumps(output)),  # what RunPod sends on: JSON
        "adapter_manifest": json.loads((adapter / "manifest.json").read_text()),
        "job_manifest": json.loads((adapter.parent / "manifest.json").read_text()),
        "artifact_row": records.get_artifact("golden"),
        "job_row": records.get_job("golden"),
    }


def test_the_job_output_manifests_and_rows_keep_their_json_and_share_one_manifest(volume):
    docs = _produce(volume)  # one training run for both checks: the suite runs on a few CPUs
    assert_matches_golden(docs, volume)
    assert_from_one_manifest(docs)


def assert_matches_golden(actual: dict[str, Any], volume: Path) -> None:
    golden = {name: json.loads((GOLDEN / f"{name}.json").read_text()) for name in DOCUMENTS}
    golden_volume = golden["output"]["base_model"]["path"].removesuffix("/models/tiny-llama")

    for name in DOCUMENTS:
        golden_losses: dict[str, float] = {}
        actual_losses: dict[str, float] = {}
        expected = normalize(golden[name], golden_volume, losses=golden_losses)
        got = normalize(actual[name], str(volume), losses=actual_losses)
        assert_same_json(expected, got, name)
        assert list(actual_losses) == list(golden_losses), name
        for path, value in golden_losses.items():
            assert math.isclose(actual_losses[path], value, rel_tol=LOSS_TOLERANCE), f"{name}.{path}"


def assert_from_one_manifest(docs: dict[str, Any]) -> None:
    """The output, the artifact row and both manifest.json files are views of one manifest."""
    output, manifest, row = docs["output"], docs["adapter_manifest"], docs["artifact_row"]
    base, peft, metrics, report = (manifest["base_model"], manifest["peft"], manifest["metrics"],
                                   manifest["dataset"])

    # the row records the adapter's manifest.json exactly as stored, and its parts
    assert row["manifest"] == manifest
    assert (row["base_model_id"], row["base_model_revision"], row["base_model_fingerprint"]) == (
        base["id"], base["revision"], base["fingerprint"])
    assert row["metrics"] == metrics
    assert (row["uri"], row["bytes"], row["id"]) == (output["adapter"]["uri"], output["adapter"]["bytes"],
                                                      output["record_id"])
    # the output is the manifest, seen from the caller
    assert output["base_model"] == {k: v for k, v in base.items() if k != "architecture"}
    assert output["metrics"] == {k: metrics.get(k) for k in output["metrics"]}
    assert output["dataset"] == {k: report[k] for k in output["dataset"]}
    assert output["lora"] == {"r": peft["r"], "alpha": peft["lora_alpha"],
                              "target_modules": peft["target_modules"], "target_parameters": peft["target_parameters"]}
    assert output["memory_plan"] == manifest["memory_plan"]
    assert output["adapter"]["files"] == manifest["files"]
    assert output["adapter"]["bytes"] == sum(f["bytes"] for f in manifest["files"])
    # the job folder's manifest differs only in the files it lists (the adapter's manifest among them)
    job_manifest = docs["job_manifest"]
    assert {k: v for k, v in job_manifest.items() if k != "files"} == {
        k: v for k, v in manifest.items() if k != "files"}
    listed = {f["name"] for f in job_manifest["files"]}
    assert {"adapter/" + f["name"] for f in manifest["files"]} | {"adapter/manifest.json"} <= listed
    # the job row carries the output RunPod got
    assert docs["job_row"]["output"] == output
    assert docs["job_row"]["last_loss"] == metrics["last_loss"]


def test_a_manifest_written_by_an_older_worker_reads_and_round_trips():
    """A re-delivered job reads the manifest an earlier version stored: keys it lacks stay absent,
    keys this version does not know are kept, and the output keeps its shape."""
    old = json.loads((GOLDEN / "adapter_manifest.json").read_text())
    for key in ("memory_plan", "runtime"):
        del old[key]
    del old["base_model"]["load"], old["peft"]["target_parameters"], old["metrics"]["batching"]
    old["dataset"]["from_an_older_worker"] = True
    old["notes"] = "kept"

    manifest = AdapterManifest.model_validate(old)
    assert manifest.to_dict() == old and list(manifest.to_dict()) == list(old)
    stored = StoredArtifact(uri="file:///a/", adapter_uri="file:///a/adapter/", bytes=1,
                            files=list(manifest.files), manifest=manifest)
    output = _train_output("old", stored, "r1", {"total_s": 1.0}, None)
    assert output["memory_plan"] is None and output["lora"]["target_parameters"] is None
    assert "load" not in output["base_model"] and output["metrics"]["eval_loss"] is None
    row = _artifact_record(stored)
    assert row.manifest == old and row.base_model_fingerprint == old["base_model"]["fingerprint"]


def test_a_row_update_names_only_the_columns_it_sets():
    """The Edge Function's row may already hold user_id and metadata: an update leaves them alone,
    while a column set to None (a success clears ``error``) is written as null."""
    assert JobUpdate(status="running", error=None).columns() == {"status": "running", "error": None}
    assert JobUpdate.model_validate({"progress": 0.5}).columns() == {"progress": 0.5}
    assert "user_id" in JOB_COLUMNS and "manifest" in ARTIFACT_COLUMNS
    with pytest.raises(ValidationError, match="stauts"):
        JobUpdate.model_validate({"stauts": "running"})


def test_the_model_card_of_the_golden_manifest_is_unchanged():
    """The typed manifest renders the model card the golden adapter carries, byte for byte."""
    golden = json.loads((GOLDEN / "adapter_manifest.json").read_text())
    card = render_model_card(AdapterManifest.model_validate(golden)).encode()
    (entry,) = [f for f in golden["files"] if f["name"] == "README.md"]
    assert (len(card), hashlib.sha256(card).hexdigest()) == (entry["bytes"], entry["sha256"])
