"""Data files → records: JSONL, JSON arrays, CSV/TSV and Parquet, any of the text ones gzip-compressed.

The format comes from the file's name (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, each optionally
``.gz``) and is checked against its first bytes (gzip and Parquet magic numbers win over a wrong
extension; a name with no extension is sniffed). Every record keeps where it came from — ``line N``
for JSONL and CSV, ``record N`` for JSON arrays and Parquet rows — so an error can point at it.

Files are read as streams: JSONL and CSV line by line, Parquet in row batches, and reading stops
after ``limit`` records (``max_examples``). Decompressed bytes count against the same cap as the
file, which stops a gzip bomb while it inflates.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from errors import DatasetError

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
    ".parquet": "parquet",
}
DATA_SUFFIXES = tuple(EXTENSIONS) + tuple(ext + ".gz" for ext in EXTENSIONS if ext != ".parquet")
# JSON files that describe a dataset rather than hold it (Hub repos, save_to_disk folders).
METADATA_NAMES = ("dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json")


def is_data_file(path: str) -> bool:
    """Whether a file in a folder or repo is data: a known extension, not metadata, not hidden."""
    parts = path.split("/")
    return (path.lower().endswith(DATA_SUFFIXES) and parts[-1].lower() not in METADATA_NAMES
            and not any(p.startswith(".") for p in parts))
# CSV columns that hold a conversation as JSON text (how spreadsheets and pandas export them).
JSON_COLUMNS = ("messages", "conversations")


@dataclass
class Records:
    """Parsed rows and where each came from (``unit`` + number), plus what the files were."""

    rows: list[Any] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # per file
    file_of: list[int] = field(default_factory=list)  # index into files, per row (multi-file only)
    files: list[str] = field(default_factory=list)
    file_formats: list[str] = field(default_factory=list)

    def where(self, index: int) -> str:
        file_index = self.file_of[index] if self.file_of else 0
        place = f"{self.units[file_index]} {self.numbers[index]}"
        return f"{self.files[file_index]} {place}" if len(self.files) > 1 else place


class _CappedReader(io.RawIOBase):
    """Counts bytes read through it and stops with DatasetError past ``cap`` (decompressed data)."""

    def __init__(self, inner: IO[bytes], cap: int, name: str):
        self.inner, self.cap, self.name, self.count = inner, cap, name, 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.inner.close()
        super().close()

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        self.count += len(data)
        if self.count > self.cap:
            raise DatasetError(
                f"{self.name} decompresses to more than the {self.cap}-byte cap (MAX_DATASET_BYTES); "
                "split the file or raise the cap"
            )
        buffer[: len(data)] = data
        return len(data)


def file_format(path: Path, name: str) -> tuple[str, bool]:
    """(format, gzipped) from the name, corrected by the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    gzipped = head[:2] == GZIP_MAGIC
    # The shown name's extension, else the local copy's (named after a redirect or Content-Disposition).
    fmt = _named_format(name) or _named_format(path.name)
    if head == PARQUET_MAGIC:
        return "parquet", False
    if fmt == "parquet":
        raise DatasetError(f"{name} is named .parquet but is not a Parquet file (no PAR1 header); "
                           "export it again or give it its real extension")
    if fmt is None:
        fmt = _sniff(path, gzipped, name)
    return fmt, gzipped


def _named_format(name: str) -> str | None:
    lower = name.lower().split("?", 1)[0].removesuffix(".gz")
    return EXTENSIONS.get(Path(lower).suffix)


def _sniff(path: Path, gzipped: bool, name: str) -> str:
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{name} is not a readable gzip file ({exc}); compress it again") from None
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        return "jsonl"
    if not text:
        return "jsonl"  # empty: reported as such by the reader
    raise DatasetError(
        f"cannot tell the format of {name}: it does not start like JSON, JSONL or Parquet; name it "
        ".jsonl, .json, .csv, .tsv or .parquet"
    )


def read_files(paths: list[Path], names: list[str], *, cap: int, limit: int | None) -> Records:
    """Read every file in order into one Records, stopping once ``limit`` rows are read."""
    out = Records()
    for index, (path, name) in enumerate(zip(paths, names)):
        if limit is not None and len(out.rows) >= limit:
            break
        fmt, gzipped = file_format(path, name)
        out.files.append(name)
        out.file_formats.append(fmt + (".gz" if gzipped else ""))
        before = len(out.rows)
        remaining = None if limit is None else limit - len(out.rows)
        for number, row in _rows(path, name, fmt, gzipped, cap, remaining, out):
            out.rows.append(row)
            out.numbers.append(number)
        # A .json file that turned out to be JSONL counts lines, not array items.
        final = out.file_formats[-1].removesuffix(".gz")
        out.units.append("line" if final in ("jsonl", "csv", "tsv") else "record")
        if len(paths) > 1:
            out.file_of.extend([index] * (len(out.rows) - before))
    if not out.rows:
        shown = names[0] if len(names) == 1 else f"{len(names)} files ({', '.join(names[:3])})"
        raise DatasetError(f"{shown} is empty: it holds no records; check that the right file was uploaded")
    if len(paths) == 1:
        out.file_of = []
    return out


def _open_text(path: Path, gzipped: bool, cap: int, name: str) -> IO[bytes]:
    if gzipped:
        return io.BufferedReader(_CappedReader(gzip.open(path, "rb"), cap, name), 1 << 20)
    return open(path, "rb")


def _rows(path: Path, name: str, fmt: str, gzipped: bool, cap: int, limit: int | None,
          out: Records) -> Iterator[tuple[int, Any]]:
    if path.stat().st_size == 0:
        raise DatasetError(f"{name} is empty (0 bytes); check that the right file was uploaded")
    try:
        if fmt == "parquet":
            yield from _parquet_rows(path, name, limit)
        elif fmt in ("csv", "tsv"):
            yield from _csv_rows(path, name, gzipped, cap, limit, "\t" if fmt == "tsv" else ",")
        elif fmt == "json":
            yield from _json_rows(path, name, gzipped, cap, limit, out)
        else:
            yield from _jsonl_rows(path, name, gzipped, cap, limit)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{name} is a damaged gzip file ({exc}); compress it again") from None


def _jsonl_rows(path: Path, name: str, gzipped: bool, cap: int, limit: int | None
                ) -> Iterator[tuple[int, Any]]:
    count = 0
    with _open_text(path, gzipped, cap, name) as f:
        for number, line in enumerate(f, start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{name} line {number} is not UTF-8 text (byte {exc.start + 1} of the "
                                   "line); save the file as UTF-8") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{name} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); each line "
                    "must be one JSON object"
                ) from None
            count += 1
            yield number, row


def _json_rows(path: Path, name: str, gzipped: bool, cap: int, limit: int | None,
               out: Records) -> Iterator[tuple[int, Any]]:
    with _open_text(path, gzipped, cap, name) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name} is not UTF-8 text (byte {exc.start + 1}); save it as UTF-8") from None
    del data
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line in a file named .json: it is JSONL.
            out.file_formats[-1] = "jsonl" + (".gz" if gzipped else "")
            del text
            yield from _jsonl_rows(path, name, gzipped, cap, limit)
            return
        raise DatasetError(
            f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; a .json file "
            "must hold one array of records ([{…}, {…}]), or use JSONL (one object per line)"
        ) from None
    del text
    if isinstance(document, dict):
        document = [document] if _looks_like_record(document) else document
    if not isinstance(document, list):
        keys = sorted(document)[:10] if isinstance(document, dict) else type(document).__name__
        raise DatasetError(
            f"{name} holds a JSON {'object' if isinstance(document, dict) else 'value'} ({keys}), not an "
            "array of records; put the records in a top-level array ([{…}, {…}]) or use JSONL"
        )
    for number, row in enumerate(document[:limit] if limit is not None else document, start=1):
        yield number, row


def _looks_like_record(obj: dict) -> bool:
    return any(key in obj for key in ("messages", "conversations", "prompt", "instruction", "text"))


def _csv_rows(path: Path, name: str, gzipped: bool, cap: int, limit: int | None, delimiter: str
              ) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(min(cap, sys.maxsize))  # one cell may hold a whole long document
    with _open_text(path, gzipped, cap, name) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = [c.strip() for c in header]
            if len(set(columns)) != len(columns) or not all(columns):
                raise DatasetError(f"{name} line 1 (the header) has empty or repeated column names {columns}; "
                                   "give every column a unique name")
            count = 0
            start = reader.line_num + 1
            for cells in reader:
                number, start = start, reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if limit is not None and count >= limit:
                    return
                if len(cells) != len(columns):
                    raise DatasetError(
                        f"{name} line {number} has {len(cells)} fields but the header has {len(columns)} "
                        f"({', '.join(columns)}); quote fields that contain '{delimiter}' or line breaks"
                    )
                row: dict[str, Any] = dict(zip(columns, cells))
                for key in JSON_COLUMNS:
                    if isinstance(row.get(key), str):
                        try:
                            row[key] = json.loads(row[key])
                        except json.JSONDecodeError as exc:
                            raise DatasetError(
                                f"{name} line {number}: column '{key}' is not valid JSON ({exc.msg} at "
                                f"column {exc.colno}); a CSV cell must hold the turns as a JSON array"
                            ) from None
                count += 1
                yield number, row
        except csv.Error as exc:
            raise DatasetError(f"{name} line {reader.line_num} is not valid CSV ({exc}); check its quoting") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{name} near line {reader.line_num + 1} is not UTF-8 text (byte {exc.start + 1});"
                               " save the file as UTF-8") from None


def _parquet_rows(path: Path, name: str, limit: int | None) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                if limit is not None and number >= limit:
                    return
                number += 1
                yield number, row
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{name} is not a readable Parquet file ({type(exc).__name__}: {exc}); "
                           "write it again with pyarrow or pandas") from None
