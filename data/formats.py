"""Data files → records: JSONL, JSON arrays, CSV/TSV and Parquet, any of the text ones gzip-compressed.

The format comes from the file's name (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, each optionally
``.gz``) and is checked against its first bytes (gzip and Parquet magic numbers win over a wrong
extension; a name with no extension is sniffed). Every record keeps where it came from — ``line N``
for JSONL and CSV, ``record N`` for JSON arrays and Parquet rows — so an error can point at it.

Files are read as streams: JSONL and CSV line by line, JSON arrays element by element, Parquet one
row group at a time in small batches, and reading stops after ``limit`` records (``max_examples``).
Every record, decoded byte (decompressed gzip, Parquet values once expanded from their dictionary)
and second is counted against the read's budget (data/budget.py) before it becomes Python objects,
so a compression bomb or a file of millions of tiny rows stops at a cap with a ``dataset:`` error.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from data.budget import FileBudget, ReadBudget
from errors import DatasetError

CHUNK = 1 << 20
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


class _CountingReader(io.RawIOBase):
    """Counts the bytes read through it (decompressed, for gzip) against the file's budget."""

    def __init__(self, inner: IO[bytes], budget: FileBudget):
        self.inner, self.budget = inner, budget

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.inner.close()
        super().close()

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        self.budget.add(len(data))
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


def read_files(paths: list[Path], names: list[str], *, budget: ReadBudget, limit: int | None) -> Records:
    """Read every file in order into one Records, stopping once ``limit`` rows are read.

    Every row is counted against ``budget`` as it is read (records, decoded bytes, seconds), so a
    file's cost is bounded by the caps, never by what it turns out to hold.
    """
    out = Records()
    for index, (path, name) in enumerate(zip(paths, names)):
        if limit is not None and len(out.rows) >= limit:
            break
        fmt, gzipped = file_format(path, name)
        out.files.append(name)
        out.file_formats.append(fmt + (".gz" if gzipped else ""))
        before = len(out.rows)
        remaining = None if limit is None else limit - len(out.rows)
        counted = budget.file(name, path.stat().st_size, "decompresses" if gzipped else "decodes")
        for number, row in _rows(path, name, fmt, gzipped, counted, remaining, out):
            budget.add_record(name)
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


def _open_text(path: Path, gzipped: bool, budget: FileBudget) -> IO[bytes]:
    inner = gzip.open(path, "rb") if gzipped else open(path, "rb")
    return io.BufferedReader(_CountingReader(inner, budget), CHUNK)


def _rows(path: Path, name: str, fmt: str, gzipped: bool, budget: FileBudget, limit: int | None,
          out: Records) -> Iterator[tuple[int, Any]]:
    if path.stat().st_size == 0:
        raise DatasetError(f"{name} is empty (0 bytes); check that the right file was uploaded")
    try:
        if fmt == "parquet":
            yield from _parquet_rows(path, name, limit, budget)
        elif fmt in ("csv", "tsv"):
            yield from _csv_rows(path, name, gzipped, budget, limit, "\t" if fmt == "tsv" else ",")
        elif fmt == "json":
            yield from _json_rows(path, name, gzipped, budget, limit, out)
        else:
            yield from _jsonl_rows(path, name, gzipped, budget, limit)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{name} is a damaged gzip file ({exc}); compress it again") from None
    except RecursionError:
        raise DatasetError(f"{name} holds a value nested too deeply to read (over about 1,000 levels of "
                           "[ or {); flatten the records") from None


_BLANK = b" \t\n\r\f\v"


def _numbered_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for every non-blank line, reading ``CHUNK`` bytes at a time.

    A block of nothing but blank lines (a gzip of newlines inflates to gigabytes of them) is counted
    and skipped in C, not one Python iteration per line; a line longer than a block is joined once.
    """
    number, pending, first = 1, [], True
    while True:
        block = f.read(CHUNK)
        if not block:
            break
        if first:
            block, first = block.removeprefix(b"\xef\xbb\xbf"), False
        cut = block.rfind(b"\n")
        if cut < 0:
            pending.append(block)
            continue
        data = b"".join(pending) + block[: cut + 1] if pending else block[: cut + 1]
        pending = [block[cut + 1:]]
        if not data.translate(None, _BLANK):
            number += data.count(b"\n")
            continue
        for line in data.split(b"\n")[:-1]:
            if line.strip():
                yield number, line
            number += 1
    tail = b"".join(pending)
    if tail.strip():
        yield number, tail


def _jsonl_rows(path: Path, name: str, gzipped: bool, budget: FileBudget, limit: int | None
                ) -> Iterator[tuple[int, Any]]:
    count = 0
    with _open_text(path, gzipped, budget) as f:
        for number, line in _numbered_lines(f):
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


_WHITESPACE = re.compile(r"\s*")


def _json_rows(path: Path, name: str, gzipped: bool, budget: FileBudget, limit: int | None,
               out: Records) -> Iterator[tuple[int, Any]]:
    with _open_text(path, gzipped, budget) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name} is not UTF-8 text (byte {exc.start + 1}); save it as UTF-8") from None
    del data
    start = _WHITESPACE.match(text).end()
    try:
        if text.startswith("[", start):
            # One element at a time: each record is counted as it is parsed, never a whole document.
            yield from _json_array(text, start + 1, limit)
            return
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line in a file named .json: it is JSONL.
            out.file_formats[-1] = "jsonl" + (".gz" if gzipped else "")
            del text
            budget.budget.decoded -= budget.decoded  # read again as lines: count the bytes once
            budget.decoded = 0
            yield from _jsonl_rows(path, name, gzipped, budget, limit)
            return
        raise DatasetError(
            f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; a .json file "
            "must hold one array of records ([{…}, {…}]), or use JSONL (one object per line)"
        ) from None
    del text
    if isinstance(document, dict) and _looks_like_record(document):
        yield 1, document
        return
    keys = sorted(document)[:10] if isinstance(document, dict) else type(document).__name__
    raise DatasetError(
        f"{name} holds a JSON {'object' if isinstance(document, dict) else 'value'} ({keys}), not an "
        "array of records; put the records in a top-level array ([{…}, {…}]) or use JSONL"
    )


def _json_array(text: str, position: int, limit: int | None) -> Iterator[tuple[int, Any]]:
    """The elements of the array whose ``[`` ends at ``position``, numbered from 1."""
    decoder = json.JSONDecoder()
    position = _WHITESPACE.match(text, position).end()
    if text.startswith("]", position):
        return
    number = 0
    while True:
        if limit is not None and number >= limit:
            return
        value, position = decoder.raw_decode(text, position)
        number += 1
        yield number, value
        position = _WHITESPACE.match(text, position).end()
        if text.startswith(",", position):
            position = _WHITESPACE.match(text, position + 1).end()
        elif text.startswith("]", position):
            if text[position + 1:].strip():
                raise json.JSONDecodeError("Extra data", text, position + 1)
            return
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, position)


def _looks_like_record(obj: dict) -> bool:
    return any(key in obj for key in ("messages", "conversations", "prompt", "instruction", "text"))


def _csv_rows(path: Path, name: str, gzipped: bool, budget: FileBudget, limit: int | None, delimiter: str
              ) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(min(budget.budget.max_bytes, sys.maxsize))  # one cell may hold a long document
    with _open_text(path, gzipped, budget) as raw:
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
                count += 1
                yield number, _csv_row(dict(zip(columns, cells)), name, number)
        except csv.Error as exc:
            raise DatasetError(f"{name} line {reader.line_num} is not valid CSV ({exc}); check its quoting") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{name} near line {reader.line_num + 1} is not UTF-8 text (byte {exc.start + 1});"
                               " save the file as UTF-8") from None


def _csv_row(row: dict[str, Any], name: str, number: int) -> dict[str, Any]:
    for key in JSON_COLUMNS:
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{name} line {number}: column '{key}' is not valid JSON ({exc.msg} at "
                    f"column {exc.colno}); a CSV cell must hold the turns as a JSON array"
                ) from None
    return row


PARQUET_BATCH = 128  # rows decoded at once: what a nested column can expand to before it is counted


def _parquet_rows(path: Path, name: str, limit: int | None, budget: FileBudget) -> Iterator[tuple[int, Any]]:
    """Rows of one row group at a time, in small batches, each batch's decoded size counted before
    any of it becomes Python objects. Top-level text columns are read as dictionaries, so a value
    repeated in every row (a dictionary bomb) is held once and its expansion is counted, not built."""
    import pyarrow as pa

    try:
        parquet = _open_parquet(path)
        number = 0
        for group in range(parquet.metadata.num_row_groups):
            declared = parquet.metadata.row_group(group).total_byte_size
            if budget.budget.decoded + declared > budget.budget.max_bytes:
                budget.add(declared)  # its uncompressed pages alone pass the cap: refused unread
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], use_threads=False):
                budget.add(_decoded_bytes(batch))
                for row in batch.to_pylist():
                    if limit is not None and number >= limit:
                        return
                    number += 1
                    yield number, row
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{name} is not a readable Parquet file ({type(exc).__name__}: {exc}); "
                           "write it again with pyarrow or pandas") from None


def _open_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    return pq.ParquetFile(path, read_dictionary=text)


def _decoded_bytes(batch) -> int:
    """Bytes the batch takes once decoded: dictionary columns by their values' lengths per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for column in batch.columns:
        if not pa.types.is_dictionary(column.type):
            total += column.nbytes
            continue
        values, indices = column.dictionary, column.indices
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or \
                pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            total += pc.sum(pc.take(pc.binary_length(values), indices)).as_py() or 0
        else:  # a dictionary of fixed-width values: each row holds one
            total += len(indices) * (values.nbytes // max(len(values), 1))
        total += indices.nbytes
    return total
