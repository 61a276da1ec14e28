"""Loading from a network volume: stage onto local disk with sequential reads when that pays."""

from __future__ import annotations

import json
from pathlib import Path

import handler
from models import staging as model_staging
from models.staging import STAGED_MARKER, filesystem_type, is_network_filesystem, plan_loading, stage_folder
from tests.conftest import small_job


def test_local_filesystems_load_directly(tiny_llama, tmp_path):
    assert not is_network_filesystem(tiny_llama)
    plan = plan_loading(tiny_llama, "auto", tmp_path / "stage")
    assert (plan.path, plan.staged) == (tiny_llama, False)
    assert plan_loading(tiny_llama, "direct", tmp_path / "stage").staged is False


def test_mountinfo_is_read_for_the_longest_matching_mount(monkeypatch, tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - overlay overlay rw\n"
        "40 22 0:50 / /runpod-volume rw,relatime - nfs4 10.0.0.5:/vol rw,vers=4.1\n"
        "41 22 0:51 / /runpod-volume-fuse rw - fuse.mfs mfs rw\n")
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real_read(info) if str(self) == "/proc/self/mountinfo"
                        else real_read(self, *a, **k))
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: self)
    assert filesystem_type(Path("/runpod-volume/models/x")) == "nfs4"
    assert filesystem_type(Path("/runpod-volume-fuse/models/x")) == "fuse.mfs"
    assert filesystem_type(Path("/app/x")) == "overlay"
    assert is_network_filesystem(Path("/runpod-volume/models/x"))
    assert is_network_filesystem(Path("/runpod-volume-fuse/m"))
    assert not is_network_filesystem(Path("/app/x"))


def test_staging_copies_everything_once_and_marks_it_complete(tiny_llama, tmp_path):
    target, copied = stage_folder(tiny_llama, tmp_path / "stage")
    originals = {p.name: p.read_bytes() for p in tiny_llama.iterdir() if p.is_file()}
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file() and p.name != STAGED_MARKER} == originals
    assert copied == sum(len(b) for b in originals.values())
    assert json.loads((target / STAGED_MARKER).read_text())["source"] == str(tiny_llama)
    again, copied_again = stage_folder(tiny_llama, tmp_path / "stage")
    assert (again, copied_again) == (target, 0)  # reused


def test_interrupted_staging_is_finished_not_trusted(tiny_llama, tmp_path):
    target, _ = stage_folder(tiny_llama, tmp_path / "stage")
    (target / STAGED_MARKER).unlink()
    (target / "model.safetensors").write_bytes(b"half")  # as if killed mid-copy
    again, copied = stage_folder(tiny_llama, tmp_path / "stage")
    assert again == target and copied == (tiny_llama / "model.safetensors").stat().st_size
    assert (target / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()


def test_no_room_on_local_disk_loads_directly(tiny_llama, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(model_staging, "is_network_filesystem", lambda path: True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    plan = plan_loading(tiny_llama, "auto", tmp_path / "stage")
    assert plan.staged is False and "not enough local disk" in plan.reason


def test_a_job_on_a_network_volume_trains_from_the_staged_copy(volume, monkeypatch, tmp_path):
    monkeypatch.setattr(model_staging, "is_network_filesystem", lambda path: True)
    monkeypatch.setattr(model_staging, "filesystem_type", lambda path: "nfs4")
    monkeypatch.setenv("LOCAL_STAGE_DIR", str(tmp_path / "local-disk"))
    output = handler.handler({"id": "staged", "input": small_job()})
    assert output["status"] == "succeeded", output
    load = output["base_model"]["load"]
    assert load["staged"] is True and load["stage_reason"] == "network filesystem (nfs4)"
    assert load["load_path"].startswith(str(tmp_path / "local-disk"))
    assert output["base_model"]["path"] == str(volume / "models" / "tiny-llama")  # the record names the source
