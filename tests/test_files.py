"""files.py: atomic writes with unique temporary names, folders published whole, the hub error map."""

from __future__ import annotations

import json
import struct

import pytest

from files import atomic_writer, publish_folder, write_json_atomic, write_text_atomic


def test_an_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "refs" / "main"
    target.parent.mkdir()
    write_text_atomic(target, "a" * 40)
    assert target.read_text() == "a" * 40
    with pytest.raises(RuntimeError):
        with atomic_writer(target, "w") as fh:
            fh.write("b" * 20)
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "a" * 40  # the old file, whole
    assert [p.name for p in target.parent.iterdir()] == ["main"]  # no temporary file left


def test_two_writers_never_share_a_temporary_name(tmp_path):
    target = tmp_path / "marker.json"
    with atomic_writer(target, "w") as first, atomic_writer(target, "w") as second:
        assert first.name != second.name
        first.write("{}")
        second.write("[]")
    assert json.loads(target.read_text()) == {}  # the last to finish wins, whole
    write_json_atomic(target, {"files": {"a": 1}})
    assert json.loads(target.read_text()) == {"files": {"a": 1}}


def test_publish_folder_takes_an_empty_place_and_refuses_a_used_one(tmp_path):
    def finished(name: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(name)
        return folder

    final = tmp_path / "out"
    publish_folder(finished(".tmp1"), final)
    assert (final / "manifest.json").read_text() == ".tmp1"
    with pytest.raises(FileExistsError):
        publish_folder(finished(".tmp2"), final)
    assert (final / "manifest.json").read_text() == ".tmp1" and (tmp_path / ".tmp2").is_dir()
    publish_folder(tmp_path / ".tmp2", final, replace=True)
    assert (final / "manifest.json").read_text() == ".tmp2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the stale copy is gone
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_folder(finished(".tmp3"), empty)
    assert (empty / "manifest.json").read_text() == ".tmp3"


# --- safetensors headers ---------------------------------------------------------------------------


def _safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_header_gives_dtypes_shapes_and_offsets(tmp_path):
    from models.safetensors import read_header, safetensors_extent

    path = tmp_path / "model.safetensors"
    _safetensors(path, {"__metadata__": {"format": "pt"},
                        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}, b"\0" * 32)
    header = read_header(path)
    assert (header.tensors["a"].dtype, header.tensors["a"].shape) == ("F32", (2, 3))
    assert header.tensors["b"].end == path.stat().st_size == header.extent == safetensors_extent(path)
    path.write_bytes(path.read_bytes()[:-1])
    assert safetensors_extent(path) != path.stat().st_size  # a truncated file shows


@pytest.mark.parametrize("content, problem", [
    (b"\x01", "is not a safetensors file (shorter than 8 bytes)"),
    (struct.pack("<Q", 200 * 1024 * 1024), "over the 104857600-byte limit"),
    (struct.pack("<Q", 100) + b"{}", "is truncated inside its header (2 of 100 bytes)"),
    (struct.pack("<Q", 5) + b"{nope", "has a header that is not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "has a header that is not a JSON object"),
    (struct.pack("<Q", 13) + b'{"a": {"x":1}', "has a header that is not valid JSON"),
    (struct.pack("<Q", 14) + b'{"a": {"x":1}}', "tensor 'a' has no valid dtype, shape and data_offsets"),
])
def test_a_broken_header_says_what_is_wrong(tmp_path, content, problem):
    from models.safetensors import SafetensorsError, read_header, safetensors_extent

    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError) as info:
        read_header(path)
    assert str(info.value).startswith("w.safetensors") and problem in str(info.value)
    assert safetensors_extent(path) == -1


def test_one_shard_list_for_every_reader(tmp_path):
    from models.folder import check_model_folder
    from models.safetensors import SafetensorsError, weight_files

    assert weight_files(tmp_path) is None
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-2.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"}}))
    assert weight_files(tmp_path) == ["model-1.safetensors", "model-2.safetensors"]
    (tmp_path / "config.json").write_text("{}")
    assert check_model_folder(tmp_path)[:2] == ["weight shard model-1.safetensors is missing",
                                                "weight shard model-2.safetensors is missing"]
    (tmp_path / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(SafetensorsError, match="is not a valid weight index"):
        weight_files(tmp_path)
    assert check_model_folder(tmp_path) == ["model.safetensors.index.json is not a valid weight index"]


# --- the Hub's errors: one map, a hint and an error class per kind ---------------------------------


@pytest.mark.parametrize("kind, stage", [("model", "model"), ("dataset", "dataset")])
def test_the_hub_error_map_keeps_the_stage_of_what_was_fetched(kind, stage):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from hub_errors import HubTarget, hub_error

    target = HubTarget(kind, "acme/x", None, has_token=False, shown="hf://acme/x" if kind == "dataset" else "")
    offline = hub_error(OfflineModeIsEnabled("offline"), target)
    assert offline.stage == stage and "HF_HUB_OFFLINE is set" in offline.message and not offline.retryable
    unreachable = hub_error(ConnectionResetError("reset"), target)
    assert unreachable.stage == stage and unreachable.retryable
    assert (unreachable.message.startswith("downloading acme/x failed (ConnectionResetError: reset)") if kind == "model"
            else unreachable.message == "hf://acme/x: the Hub could not be reached (ConnectionResetError); try "
                                        "again or prefetch the dataset onto the volume")
