"""What a dataset fetch gives back, and the size cap every source enforces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from errors import DatasetError


@dataclass
class Fetched:
    """Local files holding a dataset, in order, and what they are."""

    paths: list[Path]
    names: list[str]  # printable, one per path
    source: str  # printable: never a query string or credentials
    sha256: str  # of the files' bytes, concatenated in order
    bytes: int


def over_cap(name: str, size: int | str, cap: int) -> DatasetError:
    return DatasetError(
        f"{name} is {size} bytes, over the {cap}-byte cap (MAX_DATASET_BYTES); split it, trim it "
        "with max_examples before uploading, or raise the cap on the endpoint"
    )


def suffix_of(uri: str) -> str:
    """The data file's extension(s) from a URL or key, e.g. '.jsonl.gz', to name the local copy."""
    path = urlsplit(uri).path if "://" in uri else uri
    name = path.rsplit("/", 1)[-1].lower()
    from data.formats import DATA_SUFFIXES

    for suffix in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""
