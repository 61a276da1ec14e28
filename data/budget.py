"""What reading a dataset may cost: decoded bytes, records and seconds, counted as the files are read.

A file's size on disk says little about what it holds: gzip inflates up to about 1,000 times, and a
Parquet column whose values come from a dictionary can repeat one 1 MiB value in every row, so a
523-byte file decodes to gigabytes. Every reader in data/formats.py therefore counts what it decodes
*before* it turns it into Python objects, and stops with a ``DatasetError`` at the first limit passed:

- ``MAX_DATASET_BYTES``: decoded bytes of all files together (decompressed text, Parquet values);
- ``MAX_DATASET_RECORDS``: records read (a 60 MB file of tiny rows is millions of Python objects);
- ``DATASET_READ_TIMEOUT_S``: seconds spent reading and parsing;
- a file may decode to at most ``EXPANSION_LIMIT`` times its stored size once it is past
  ``EXPANSION_FLOOR`` decoded bytes: real data compresses 3-20 times, a compression bomb far more,
  and this stops one at a few hundred MiB whatever MAX_DATASET_BYTES is.

So the memory a dataset can take while it is read is bounded by these caps, not by the file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from errors import DatasetError

EXPANSION_LIMIT = 100
EXPANSION_FLOOR = 256 * 1024**2
TIME_CHECK_EVERY = 4096  # records between clock reads


@dataclass
class ReadBudget:
    """One dataset read: the caps and what has been spent on them so far."""

    max_bytes: int
    max_records: int
    timeout_s: float
    started: float = field(default_factory=time.monotonic)
    decoded: int = 0
    records: int = 0

    def file(self, name: str, stored: int, verb: str = "decodes") -> FileBudget:
        return FileBudget(self, name, stored, verb)

    def add_record(self, name: str) -> None:
        self.records += 1
        if self.records > self.max_records:
            raise DatasetError(
                f"{name}: the dataset holds more than {self.max_records} records, the cap "
                "(MAX_DATASET_RECORDS); set dataset.max_examples to train on the first ones, split the "
                "data into several jobs, or raise the cap on the endpoint"
            )
        if self.records % TIME_CHECK_EVERY == 0:
            self.check_time(name)

    def check_time(self, name: str) -> None:
        if time.monotonic() - self.started > self.timeout_s:
            raise DatasetError(
                f"{name}: reading the dataset took longer than {self.timeout_s:g}s "
                f"(DATASET_READ_TIMEOUT_S) after {self.records} records; use max_examples, a smaller "
                "file, or raise the limit on the endpoint"
            )


@dataclass
class FileBudget:
    """Decoded bytes of one file, checked against the dataset's cap and the file's expansion."""

    budget: ReadBudget
    name: str
    stored: int
    verb: str = "decodes"  # "decompresses" for gzip: how the messages say what happened
    decoded: int = 0

    def add(self, size: int) -> None:
        self.decoded += size
        self.budget.decoded += size
        if self.budget.decoded > self.budget.max_bytes:
            raise DatasetError(
                f"{self.name} {self.verb} to more than the {self.budget.max_bytes}-byte cap "
                "(MAX_DATASET_BYTES; decompressed text and Parquet values count); split the data or "
                "trim it with max_examples before uploading"
            )
        limit = max(EXPANSION_FLOOR, EXPANSION_LIMIT * self.stored)
        if self.decoded > limit:
            raise DatasetError(
                f"{self.name} {self.verb} to more than {EXPANSION_LIMIT} times its {self.stored} stored bytes "
                f"(over {self.decoded} bytes so far): a compression bomb, or data so repetitive that it "
                f"should be split into files that each decode to under {EXPANSION_FLOOR // 1024**2} MiB"
            )
        self.budget.check_time(self.name)
