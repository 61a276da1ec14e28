"""safetensors files read without loading a weight: one header reader, and which files hold a model's weights.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name →
dtype, shape and data offsets), then the data. Everything here reads the first 8 + N bytes only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from errors import ModelError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file, or a weight index that is not valid."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets in the file, header included
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    data_start: int  # 8 + the header's length

    @property
    def extent(self) -> int:
        """The size the file must have: where its last tensor ends."""
        return max((t.end for t in self.tensors.values()), default=self.data_start)


def read_header(path: str | Path) -> Header:
    """The header of one safetensors file; SafetensorsError says what is wrong with a broken one."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path.name} is not a safetensors file (header length {length}, over the "
                                   f"{MAX_HEADER_BYTES}-byte limit)")
        raw = fh.read(length)
    if len(raw) != length:
        raise SafetensorsError(f"{path.name} is truncated inside its header ({len(raw)} of {length} bytes)")
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise SafetensorsError(f"{path.name} has a header that is not valid JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise SafetensorsError(f"{path.name} has a header that is not a JSON object")
    data_start = 8 + length
    tensors = {}
    for name, info in entries.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            tensors[name] = TensorInfo(str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                       data_start + int(begin), data_start + int(end))
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path.name}: tensor {name!r} has no valid dtype, shape and data_offsets "
                                   "in the header") from None
    return Header(tensors, data_start)


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from one file's header."""
    return {name: t.shape for name, t in read_header(path).tensors.items()}


def safetensors_extent(path: Path) -> int:
    """The size a .safetensors file must have, from its header alone; -1 when the header is unreadable."""
    try:
        return read_header(path).extent
    except SafetensorsError:
        return -1


def weight_files(model_dir: str | Path) -> list[str] | None:
    """The safetensors files loading reads: the index's shards, or model.safetensors; None if neither.

    SafetensorsError when the index is not a valid weight index.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SafetensorsError(f"{INDEX_NAME} is not a valid weight index") from None
    if (model_dir / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    return None


def read_weight_headers(model_dir: str | Path) -> dict[str, TensorInfo] | None:
    """Every weight of a model folder, from its shards' headers; None if it has no safetensors weights."""
    shards = weight_files(model_dir)
    if shards is None:
        return None
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        tensors.update(read_header(Path(model_dir) / shard).tensors)
    return tensors


def read_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Every weight's shape in a model folder; None if it has no safetensors weights."""
    tensors = read_weight_headers(model_dir)
    return None if tensors is None else {name: t.shape for name, t in tensors.items()}


def safetensors_headers(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name → (dtype, shape) of every stored weight of a model folder; {} if it has none."""
    try:
        tensors = read_weight_headers(model_dir) or {}
    except SafetensorsError as exc:
        raise ModelError(f"{Path(model_dir).name}: {exc}; download the model again") from None
    return {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
