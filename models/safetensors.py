"""safetensors headers: tensor names, dtypes, shapes and extents, read without loading a weight."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from errors import ModelError

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from a safetensors file's header (its first 8 + N bytes) alone."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file (header length {length})")
        header = json.loads(fh.read(length))
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def read_weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Every weight's shape in a model folder, from the safetensors headers; None if it has none."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(read_safetensors_shapes(model_dir / shard))
    return shapes


def safetensors_extent(path: Path) -> int:
    """The size a .safetensors file must have, from its header alone (8-byte length + JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return -1
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024**2:
            return -1
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            return -1
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + length + max(ends, default=0)


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
                     "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_headers(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name → (dtype, shape) of every stored tensor, from the files' headers only."""
    headers: dict[str, tuple[str, list[int]]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024**2:
                raise ModelError(f"{file.name} has a {length}-byte header; it is not a safetensors file")
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                headers[name] = (info["dtype"], list(info["shape"]))
    return headers
