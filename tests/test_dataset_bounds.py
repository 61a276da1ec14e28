"""Finding 9 of issue 13: reading a dataset takes bounded memory and time, whatever the file holds.

Hostile files are built here: a 523-byte Parquet file whose one dictionary value (1 MiB) fills 1,500
rows (1.5 GiB decoded), a gzip of newlines, millions of tiny rows. Each must end in a clear
``dataset:`` error while memory stays far under what the file expands to.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

import handler
from config.job import DatasetSpec
from config.settings import WorkerSettings
from data.budget import EXPANSION_FLOOR
from dataset_loader import read_dataset
from errors import DatasetError
from tests.conftest import ROOT, small_job

BOMB_ROWS, BOMB_VALUE = 1500, 1 << 20  # 1.5 GiB once decoded


def write_dictionary_bomb(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.DictionaryArray.from_arrays(pa.array([0] * BOMB_ROWS, pa.int32()), pa.array(["x" * BOMB_VALUE]))
    pq.write_table(pa.table({"text": column}), path, compression="zstd", use_dictionary=True)
    return path.stat().st_size


def write_gzip_of_newlines(path: Path, size: int) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    block = b"\n" * (1 << 20)
    with open(path, "wb") as out:
        for _ in range(size >> 20):
            out.write(packer.compress(block))
        out.write(packer.flush())


@pytest.fixture
def no_weights(monkeypatch):
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))


def validate(uri: str, job_id: str = "bounds", **dataset) -> dict:
    job = small_job(action="validate")
    job["dataset"] = {"uri": uri, **dataset}  # every record: small_job's max_examples left out
    return handler.handler({"id": job_id, "input": job})


def read(uri: str, settings: WorkerSettings, **spec):
    return read_dataset(DatasetSpec(uri=uri, **spec), settings, seed=0)


# --------------------------------------------------------------------------------------------------
# Parquet


def test_a_parquet_dictionary_bomb_is_refused_with_bounded_memory(volume, no_weights):
    stored = write_dictionary_bomb(volume / "datasets" / "bomb.parquet")
    assert stored < 1024  # the file really is tiny: 523 bytes with this pyarrow
    tracemalloc.start()
    try:
        output = validate("datasets/bomb.parquet")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert output == {"error": output["error"]}, output
    assert output["error"].startswith(f"dataset: datasets/bomb.parquet decodes to more than 100 times its "
                                      f"{stored} stored bytes"), output
    assert "Traceback" not in output["error"]
    # Python objects built while reading: at most the expansion floor plus one batch, not 1.5 GiB.
    assert peak < EXPANSION_FLOOR + (256 << 20), peak


def test_the_parquet_bomb_keeps_the_process_small(volume, tmp_path):
    """The same bomb in a fresh process: its peak resident memory (Arrow's buffers included)."""
    write_dictionary_bomb(volume / "datasets" / "bomb.parquet")
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from config.job import DatasetSpec
        from config.settings import WorkerSettings
        from dataset_loader import read_dataset
        from errors import DatasetError
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_dataset(DatasetSpec(uri="datasets/bomb.parquet"), WorkerSettings(), seed=0)
            print("read", flush=True)
        except DatasetError as exc:
            print("refused", exc.message[:60], flush=True)
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VOLUME_ROOT": str(volume)})
    lines = done.stdout.split("\n")
    assert done.returncode == 0 and lines[0].startswith("refused datasets/bomb.parquet decodes"), done
    base_kib, peak_kib = map(int, lines[1].split())
    grown = (peak_kib - base_kib) * 1024
    assert grown < 1 << 30, f"reading grew the process by {grown} bytes"  # expanded: 1.5 GiB


def test_parquet_values_count_against_max_dataset_bytes(volume, no_weights, monkeypatch):
    """Plain (not bomb) data: the decoded values are what the cap measures, not the file's size."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(2000)) for _ in range(200)]
    path = volume / "datasets" / "big.parquet"
    pq.write_table(pa.table({"prompt": texts, "completion": texts}), path, compression="zstd")
    stored, decoded = path.stat().st_size, 2 * sum(map(len, texts))
    cap = (stored + decoded) // 2
    assert stored < cap < decoded
    monkeypatch.setenv("MAX_DATASET_BYTES", str(cap))
    output = validate("datasets/big.parquet")
    assert output["error"].startswith(f"dataset: datasets/big.parquet decodes to more than the {cap}-byte cap "
                                      "(MAX_DATASET_BYTES"), output


def test_huge_records_are_cut_before_they_are_tokenized(volume, no_weights):
    """Records under every cap can still be long: only what max_seq_length keeps is tokenized."""
    write_dictionary_bomb(volume / "datasets" / "bomb.parquet")
    started = time.monotonic()
    output = validate("datasets/bomb.parquet", max_examples=16)
    assert time.monotonic() - started < 60  # generous: a second here; whole, BPE took minutes
    report = output["dataset"]
    assert (report["records"], report["examples"], report["truncated"]) == (16, 16, 16), report
    assert report["longest"] == 128  # small_job's max_seq_length


def test_a_small_parquet_file_still_reads_in_full(volume):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(1000)]
    pq.write_table(pa.Table.from_pylist(rows), volume / "datasets" / "ok.parquet", row_group_size=300)
    raw = read("datasets/ok.parquet", WorkerSettings())
    assert [ex.completion for ex in raw.train] == [r["completion"] for r in rows]


# --------------------------------------------------------------------------------------------------
# gzip and text


def test_a_gzip_of_newlines_is_refused_quickly(volume, no_weights):
    size = EXPANSION_FLOOR + (32 << 20)
    write_gzip_of_newlines(volume / "datasets" / "blank.jsonl.gz", size)
    stored = (volume / "datasets" / "blank.jsonl.gz").stat().st_size
    started = time.monotonic()
    output = validate("datasets/blank.jsonl.gz")
    seconds = time.monotonic() - started
    assert output["error"].startswith(f"dataset: datasets/blank.jsonl.gz decompresses to more than 100 times "
                                      f"its {stored} stored bytes"), output
    assert seconds < 60, seconds  # generous: about a second here, where it used to take minutes


def test_blank_stretches_keep_line_numbers(volume):
    body = b"\n" * (3 << 20) + b'{"text": "a"}\n' + b" \n" * 10 + b'{"text": "b",}\n'
    (volume / "datasets" / "gaps.jsonl").write_bytes(body)
    with pytest.raises(DatasetError, match=rf"gaps.jsonl line {(3 << 20) + 12} is not valid JSON"):
        read("datasets/gaps.jsonl", WorkerSettings())


def test_a_line_longer_than_a_read_block_is_one_record(volume):
    text = "y" * (3 << 20)
    (volume / "datasets" / "long.jsonl").write_text(
        json.dumps({"prompt": "Q?", "completion": text}) + "\n" + json.dumps({"prompt": "R?", "completion": "S"}))
    raw = read("datasets/long.jsonl", WorkerSettings())
    assert [len(ex.completion) for ex in raw.train] == [len(text), 1]


# --------------------------------------------------------------------------------------------------
# records and time


TINY = b"".join(b'{"text": "r%d"}\n' % i for i in range(5000))


@pytest.mark.parametrize("name,body", [
    ("tiny.jsonl", TINY),
    ("tiny.jsonl.gz", gzip.compress(TINY)),
    ("tiny.json", json.dumps([{"text": f"r{i}"} for i in range(5000)]).encode()),
    ("tiny.csv", b"text\n" + b"".join(b"r%d\n" % i for i in range(5000))),
])
def test_records_are_counted_and_capped_as_they_are_read(volume, no_weights, monkeypatch, name, body):
    (volume / "datasets" / name).write_bytes(body)
    monkeypatch.setenv("MAX_DATASET_RECORDS", "1000")
    output = validate(f"datasets/{name}")
    assert output["error"].startswith(f"dataset: datasets/{name}: the dataset holds more than 1000 records, the "
                                      "cap (MAX_DATASET_RECORDS); set dataset.max_examples"), output
    # max_examples under the cap reads the first ones and stops there.
    raw = read(f"datasets/{name}", WorkerSettings(max_dataset_records=1000), max_examples=1000)
    assert raw.report.records == 1000 and raw.train[-1].text == "r999"


def test_reading_has_a_wall_clock_budget(volume, no_weights, monkeypatch):
    (volume / "datasets" / "tiny.jsonl").write_bytes(TINY * 4)
    monkeypatch.setenv("DATASET_READ_TIMEOUT_S", "0.000001")
    output = validate("datasets/tiny.jsonl")
    assert "(DATASET_READ_TIMEOUT_S)" in output["error"] and output["error"].startswith(
        "dataset: datasets/tiny.jsonl: reading the dataset took longer than 1e-06s"), output


@pytest.mark.parametrize("name,body", [
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
    ("deep.json", b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]"),
])
def test_deeply_nested_records_are_a_dataset_error(volume, no_weights, name, body):
    (volume / "datasets" / name).write_bytes(body)
    output = validate(f"datasets/{name}")
    assert output["error"].startswith(f"dataset: datasets/{name} holds a value nested too deeply to read"), output


# --------------------------------------------------------------------------------------------------
# Finding 11, the dataset parts: links out of the volume, tokenizer files, all-masked data


def test_a_linked_shard_pointing_outside_the_volume_is_refused(volume, no_weights, tmp_path):
    secret = tmp_path / "outside" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"text": "outside-the-volume-content"}\n')
    shards = volume / "datasets" / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text('{"text": "inside"}\n')
    (shards / "part-1.jsonl").symlink_to(secret)
    output = validate("datasets/shards")
    assert output == {"error": "input: dataset.uri: dataset file 'datasets/shards/part-1.jsonl' links outside "
                               f"the volume ({volume}); copy the file onto the volume instead of linking it"}
    # A link that stays on the volume is a shard like any other.
    (shards / "part-1.jsonl").unlink()
    (shards / "part-1.jsonl").symlink_to(volume / "datasets" / "capitals.jsonl")
    assert validate("datasets/shards", max_examples=5)["status"] == "valid"


def test_a_broken_tokenizer_is_a_model_error_naming_the_file(volume, no_weights):
    import shutil

    broken = volume / "models" / "broken-tok"
    shutil.copytree(volume / "models" / "tiny-llama", broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    job = small_job(action="validate", base_model="broken-tok")
    output = handler.handler({"id": "tok", "input": job})
    assert output["error"].startswith(f"model: the tokenizer file {broken / 'tokenizer.json'} is damaged "
                                      "(Expecting property name enclosed in double quotes at line 1)"), output


def test_all_masked_data_gets_a_hint_about_weights(volume, no_weights):
    records = [{"messages": [{"role": "user", "content": f"Q{i}?"},
                             {"role": "assistant", "content": f"A{i}.", "weight": 0}]} for i in range(4)]
    job = small_job(action="validate")
    job["dataset"] = {"records": records}
    error = handler.handler({"id": "masked", "input": job})["error"]
    assert error.startswith("dataset: no usable training examples in inline (4 records): 4 dropped: every "
                            "assistant turn has weight 0 (first: record 1); nothing is left to learn from"), error
    assert "give at least one assistant turn per conversation weight 1" in error
    assert "max_seq_length" not in error
    # Examples cut before their completion keep the length hint.
    job["dataset"] = {"records": [{"prompt": "word " * 400, "completion": "done"}]}
    error = handler.handler({"id": "short", "input": job})["error"]
    assert error.endswith("no completion tokens within max_seq_length (first: record 1); raise max_seq_length "
                          "or shorten the prompts"), error
