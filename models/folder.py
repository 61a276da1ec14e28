"""A model folder on disk: which files loading needs, and whether every shard is there and whole."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from errors import ModelError
from models.safetensors import SafetensorsError, safetensors_extent, weight_files

# Root-level files loading needs besides the weights: configs, tokenizers, chat templates.
NEEDED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|"
    r"added_tokens\.json|tokenizer\.model|spiece\.model|sentencepiece[^/]*\.model|[^/]*\.tiktoken|"
    r"vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|model\.safetensors\.index\.json|"
    r"pytorch_model\.bin\.index\.json)$"
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_model_folder(folder: Path, *, allow_pickle: bool = False) -> list[str]:
    """What is missing or broken in a model folder ([] when it is complete enough to load)."""
    problems: list[str] = []
    if not (folder / "config.json").is_file():
        return [f"{folder} has no config.json"]
    try:
        shards = weight_files(folder)
    except SafetensorsError as exc:
        return [str(exc)]
    if shards is None:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
        if pickles and not allow_pickle:
            return [f"{folder} has only pickle weights ({', '.join(pickles[:3])}), which run code when "
                    "loaded; convert them to safetensors or set ALLOW_PICKLE_WEIGHTS=true"]
        if not pickles:
            return [f"{folder} has no weights (model.safetensors or a sharded index)"]
        shards = []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            problems.append(f"weight shard {shard} is missing")
        elif path.stat().st_size != safetensors_extent(path):
            problems.append(f"weight shard {shard} is truncated or corrupt ({path.stat().st_size} bytes)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return problems


def folder_bytes(folder: Path) -> int:
    # Cache snapshots are symlinks into blobs/: count what they point at.
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_config(folder: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a JSON object; a missing or damaged one is a ModelError naming it."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: the folder is not a complete model; prefetch the model "
                         "again or name the folder that holds config.json") from None
    except (OSError, ValueError) as exc:
        reason = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ModelError(f"{path} is damaged ({reason}); prefetch the model again or restore the "
                         "file") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object; prefetch the model again or restore the file")
    return config

