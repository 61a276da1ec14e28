"""The bad-input corpus: every hostile or careless job a user could send, each through ``handler.handler``.

Each case must answer ``{"error": "<stage>: …"}`` with the expected stage (and words, where given),
in under 3 s, with no traceback text, no model weights loaded, no network beyond the loopback test
server (``loopback_only``), and none of the planted secrets anywhere it left a trace (output, log
lines, record rows, files on the volume). The counts go to build/reliability.json (RELIABILITY.md).

Cases that the other half of issue 13 closes (findings 1, 4: model folders and s3Config endpoints)
carry ``needs="…"``: strict xfail until the fix lands, then the marker comes off (none is open now).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import handler
from errors import ScrubFilter
from tests.conftest import small_job
from tests.http_server import start_file_server
from tests.reliability import (  # noqa: F401
    PLANTED,
    count,
    loopback_only,
    plant_environment,
    scan,
    volume_texts,
)

CORPUS = Path(__file__).resolve().parent / "corpus"
SECONDS = 3.0
P = PLANTED


@dataclass
class Case:
    id: str
    klass: str
    job: dict | None = None  # the whole RunPod job when given; else built from ``input``
    input: object = None  # job["input"]; None: small_job() with ``change`` applied
    change: dict = field(default_factory=dict)  # keys of small_job() replaced ("dataset", …)
    expect: str = "input:"  # the error's start; more words narrow it
    contains: str = ""
    env: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # volume path → bytes, or a corpus file name (Path)
    links: dict = field(default_factory=dict)  # volume path → target ("{outside}" = a tmp folder)
    needs: str | None = None


def deep(levels: int) -> object:
    value: object = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value


def ds(uri: str, **more) -> dict:
    return {"dataset": {"uri": uri, **more}}


def hp(**values) -> dict:
    return {"hyperparameters": {**small_job()["hyperparameters"], **values}}


RED = "{redirector}"  # the loopback test server, allowed only as a redirector
CASES: list[Case] = [
    # ---- malformed payloads ------------------------------------------------------------------
    Case("input-missing", "malformed", job={"id": "x"}, contains="the job input must be a JSON object; got NoneType"),
    Case("input-list", "malformed", input=[1, 2], contains="got list"),
    Case("input-string", "malformed", input="train please", contains="got str"),
    Case("input-number", "malformed", input=42, contains="got int"),
    Case("input-empty", "malformed", input={}),
    Case("job-not-a-dict-input-bool", "malformed", input=True),
    Case("unknown-key", "malformed", change={"epochs": 3}),
    Case("unknown-key-close", "malformed", change={"hyperparameter": {}}, contains="hyperparameters"),
    Case("unknown-nested-key", "malformed", change=hp(epoch=3), contains="epochs"),
    Case("action-unknown", "malformed", change={"action": "rm -rf"}),
    Case("action-wrong-type", "malformed", change={"action": ["train"]}),
    Case("dataset-number", "malformed", change={"dataset": 5}),
    Case("dataset-list", "malformed", change={"dataset": ["a.jsonl"]}),
    Case("dataset-empty-object", "malformed", change={"dataset": {}}),
    Case("dataset-both-uri-and-records", "malformed", change={"dataset": {"uri": "d.jsonl", "records": [{"text": "a"}]}}),
    Case("hyperparameters-list", "malformed", change={"hyperparameters": [1, 2]}),
    Case("output-string", "malformed", change={"output": "s3://x"}),
    Case("metadata-list", "malformed", change={"metadata": [1]}),
    Case("base-models-differ", "malformed", change={"base_model": "tiny-llama", **hp(base_model="other/model")}),
    Case("records-not-objects", "malformed", change={"dataset": {"records": [1, 2, 3]}}, contains="dataset.records.0"),
    Case("records-empty", "malformed", change={"dataset": {"records": []}}),
    Case("records-over-inline-cap", "malformed", change={"dataset": {"records": [{"text": "a"}] * 20}},
         env={"MAX_INLINE_RECORDS": "10"}, contains="MAX_INLINE_RECORDS"),
    # ---- wrong types and bounds ---------------------------------------------------------------
    Case("epochs-negative", "types", change=hp(epochs=-1), contains="epochs"),
    Case("epochs-huge", "types", change=hp(epochs=10**9), contains="epochs"),
    Case("epochs-string-word", "types", change=hp(epochs="three"), contains="epochs"),
    Case("epochs-string-number", "types", change=hp(epochs="3"), contains="epochs"),
    Case("batch-size-bool", "types", change=hp(batch_size=True), contains="batch_size"),
    Case("batch-size-zero", "types", change=hp(batch_size=0), contains="batch_size"),
    Case("batch-size-float", "types", change=hp(batch_size=2.5), contains="batch_size"),
    Case("learning-rate-string", "types", change=hp(learning_rate="fast"), contains="learning_rate"),
    Case("learning-rate-negative", "types", change=hp(learning_rate=-1e-3), contains="learning_rate"),
    Case("learning-rate-nan", "types", change=hp(learning_rate=float("nan")), contains="learning_rate"),
    Case("learning-rate-inf", "types", change=hp(learning_rate=float("inf")), contains="learning_rate"),
    Case("lora-r-zero", "types", change=hp(lora_r=0), contains="lora_r"),
    Case("lora-r-huge", "types", change=hp(lora_r=10**6), contains="lora_r"),
    Case("lora-dropout-one", "types", change=hp(lora_dropout=1.5), contains="lora_dropout"),
    Case("max-seq-length-huge", "types", change=hp(max_seq_length=10**12), contains="max_seq_length"),
    Case("max-seq-length-null", "types", change=hp(max_seq_length=None), contains="max_seq_length"),
    Case("target-modules-number", "types", change=hp(target_modules=5), contains="target_modules"),
    Case("quantization-unknown", "types", change=hp(quantization="1bit"), contains="quantization"),
    Case("seed-string", "types", change=hp(seed="abc"), contains="seed"),
    Case("eval-fraction-one", "types", change=ds("datasets/capitals.jsonl", eval_fraction=1.0), contains="eval_fraction"),
    Case("max-examples-zero", "types", change=ds("datasets/capitals.jsonl", max_examples=0), contains="max_examples"),
    Case("format-unknown", "types", change=ds("datasets/capitals.jsonl", format="yaml"), contains="format"),
    Case("job-id-traversal", "types", change={"job_id": "../../etc"}, contains="job_id"),
    Case("job-id-slash", "types", change={"job_id": "a/b"}, contains="job_id"),
    Case("job-id-empty", "types", change={"job_id": ""}, contains="job_id"),
    Case("job-id-number", "types", change={"job_id": 12}, contains="job_id"),
    # ---- hostile dataset URLs ----------------------------------------------------------------
    Case("url-loopback", "url", change=ds("http://127.0.0.1:9/x.jsonl"), expect="dataset:", contains="loopback"),
    Case("url-localhost", "url", change=ds("http://localhost/x.jsonl"), expect="dataset:", contains="loopback"),
    Case("url-loopback-v6", "url", change=ds("http://[::1]/x.jsonl"), expect="dataset:", contains="loopback"),
    Case("url-unspecified", "url", change=ds("http://0.0.0.0/x.jsonl"), expect="dataset:", contains="not allowed|unspecified"),
    Case("url-private-10", "url", change=ds("http://10.1.2.3/x.jsonl"), expect="dataset:", contains="private"),
    Case("url-private-172", "url", change=ds("http://172.16.0.1/x.jsonl"), expect="dataset:", contains="private"),
    Case("url-private-192", "url", change=ds("http://192.168.0.1/x.jsonl"), expect="dataset:", contains="private"),
    Case("url-cgnat", "url", change=ds("http://100.64.0.1/x.jsonl"), expect="dataset:", contains="private"),
    Case("url-metadata", "url", change=ds("http://169.254.169.254/latest/meta-data/"), expect="dataset:",
         contains="link-local"),
    Case("url-metadata-by-name", "url", change=ds("http://metadata.google.internal/computeMetadata/v1/"),
         expect="dataset:", contains="link-local"),
    Case("url-metadata-v6", "url", change=ds("http://[fd00:ec2::254]/latest/"), expect="dataset:", contains="link-local"),
    Case("url-v4-mapped-v6", "url", change=ds("http://[::ffff:127.0.0.1]/x.jsonl"), expect="dataset:", contains="loopback"),
    Case("url-decimal-ip", "url", change=ds("http://2130706433/x.jsonl"), expect="dataset:", contains="loopback|resolve"),
    Case("url-hex-ip", "url", change=ds("http://0x7f000001/x.jsonl"), expect="dataset:", contains="loopback|resolve"),
    Case("url-dns-private", "url", change=ds("https://evil.example/train.jsonl"), expect="dataset:", contains="private"),
    Case("url-dns-rebinding-name", "url", change=ds("https://rebind.example/train.jsonl"), expect="dataset:",
         contains="loopback"),
    Case("url-dns-ula", "url", change=ds("https://ula.example/train.jsonl"), expect="dataset:", contains="private"),
    Case("url-fullwidth-localhost", "unicode", change=ds("http://ｌｏｃａｌｈｏｓｔ/x.jsonl"), expect="dataset:",
         contains="loopback"),
    Case("url-unresolvable", "url", change=ds("https://no-such-host.invalid/x.jsonl"), expect="dataset:",
         contains="cannot resolve"),
    Case("url-credentials", "secrets", change=ds(f"https://user:{P.url_password}@evil.example/x.jsonl"),
         expect="dataset:", contains="user name or password"),
    Case("url-credentials-signed", "secrets", change=ds(f"https://u:{P.url_password}@evil.example/x?token={P.url_token}"),
         expect="dataset:"),
    Case("url-file-scheme", "url", change=ds("file:///etc/passwd"), contains="not supported"),
    Case("url-ftp", "url", change=ds("ftp://example.com/x.jsonl"), contains="not supported"),
    Case("url-gopher", "url", change=ds("gopher://127.0.0.1:6379/_INFO"), contains="not supported"),
    Case("url-data", "url", change=ds("data:application/json,{}"), expect="(input|dataset):"),
    Case("url-javascript", "url", change=ds("javascript:alert(1)"), expect="(input|dataset):"),
    Case("url-no-host", "url", change=ds("https:///x.jsonl"), expect="dataset:"),
    Case("url-bad-port", "url", change=ds("http://example.com:99999/x"), expect="dataset:", contains="not a valid URL"),
    Case("url-crlf", "url", change=ds("http://evil.example/x\r\nHost: internal\r\n"), expect="(input|dataset):"),
    Case("url-s3-without-settings", "url", change=ds("s3://bucket/train.jsonl"), expect="dataset:",
         contains="S3_BUCKET"),
    Case("url-hf-traversal", "url", change=ds("hf://org/name/../../secret"), expect="dataset:"),
    Case("url-hf-bad-repo", "url", change=ds("hf://only-one-part"), expect="dataset:"),
    Case("eval-uri-private", "url", change=ds("datasets/capitals.jsonl", eval_uri="http://10.0.0.1/e.jsonl"),
         expect="dataset:", contains="private"),
    Case("url-signed-token-private", "secrets", change=ds(f"http://evil.example/o/sign/x.jsonl?token={P.url_token}"),
         expect="dataset:", contains="private"),
    # ---- redirects, from the loopback server (allowed as a redirector only) -------------------
    Case("redirect-loopback-other-port", "redirect", change=ds(f"{RED}/to?u=http://127.0.0.1:9/x.jsonl"),
         expect="dataset:", contains="loopback"),
    Case("redirect-private", "redirect", change=ds(f"{RED}/to?u=http://10.0.0.7/x.jsonl"), expect="dataset:",
         contains="private"),
    Case("redirect-metadata", "redirect", change=ds(f"{RED}/to?u=http://169.254.169.254/latest/"),
         expect="dataset:", contains="link-local"),
    Case("redirect-metadata-name", "redirect", change=ds(f"{RED}/to?u=http://metadata.google.internal/"),
         expect="dataset:", contains="link-local"),
    Case("redirect-v6-loopback", "redirect", change=ds(f"{RED}/to?u=http://[::1]:9/x"), expect="dataset:",
         contains="loopback"),
    Case("redirect-dns-private", "redirect", change=ds(f"{RED}/to?u=https://intranet.example/x"),
         expect="dataset:", contains="private"),
    Case("redirect-file", "redirect", change=ds(f"{RED}/to?u=file:///etc/passwd"), expect="dataset:",
         contains="only http:// and https://"),
    Case("redirect-credentials", "redirect", change=ds(f"{RED}/to?u=http://u:{P.url_password}@evil.example/"),
         expect="dataset:", contains="user name or password"),
    Case("redirect-loop", "redirect", change=ds(f"{RED}/loop"), expect="dataset:", contains="more than 5 redirects"),
    Case("redirect-no-location", "redirect", change=ds(f"{RED}/nowhere"), expect="dataset:"),
    # ---- init_adapter -------------------------------------------------------------------------
    Case("init-adapter-loopback", "url", change={"init_adapter": "http://127.0.0.1:9/adapter/"}, expect="(input|model|train):"),
    Case("init-adapter-metadata", "url", change={"init_adapter": "http://169.254.169.254/latest/"}, expect="(input|model|train):"),
    Case("init-adapter-credentials", "secrets", change={"init_adapter": f"https://u:{P.url_password}@evil.example/a/"},
         expect="(input|model|train):"),
    Case("init-adapter-file", "url", change={"init_adapter": "file:///etc/passwd"}, expect="(input|model|train):"),
    Case("init-adapter-traversal", "traversal", change={"init_adapter": "../../etc"}, expect="(input|model|train):"),
    # ---- s3Config (finding 4) -----------------------------------------------------------------
    Case("s3config-endpoint-loopback", "url", job={"id": "s3c", "input": small_job(),
         "s3Config": P.s3_config("http://127.0.0.1:9")}, expect="(input|upload):", contains="must be a public address"),
    Case("s3config-endpoint-metadata", "url", job={"id": "s3m", "input": small_job(),
         "s3Config": P.s3_config("http://169.254.169.254")}, expect="(input|upload):", contains="must be a public address"),
    Case("s3config-incomplete", "secrets", job={"id": "s3i", "input": small_job(),
         "s3Config": {"accessId": P.aws_key_id, "accessSecret": P.aws_secret}}, expect="upload:",
         contains="bucketName"),
    Case("s3config-not-object", "malformed", job={"id": "s3n", "input": small_job(), "s3Config": "x"},
         expect="upload:"),
    # ---- paths: traversal and links ---------------------------------------------------------
    Case("dataset-abs-outside", "traversal", change=ds("/etc/passwd"), contains="outside the allowed folders"),
    Case("dataset-dotdot", "traversal", change=ds("../../etc/passwd"), contains="outside the allowed folders"),
    Case("dataset-dotdot-inside", "traversal", change=ds("datasets/../../../etc/passwd"), contains="outside"),
    Case("dataset-missing", "traversal", change=ds("datasets/none.jsonl"), expect="dataset:", contains="does not exist"),
    Case("dataset-link-out", "links", change=ds("datasets/link.jsonl"), links={"datasets/link.jsonl": "{outside}"},
         contains="links outside"),
    Case("dataset-shard-link-out", "links", change=ds("datasets/shards"),
         files={"datasets/shards/a.jsonl": b'{"text": "a"}\n'}, links={"datasets/shards/b.jsonl": "{outside}"},
         contains="links outside the volume"),
    Case("base-model-dotdot", "traversal", change={"base_model": "../../etc"}, contains="base_model"),
    Case("base-model-abs-outside", "traversal", change={"base_model": "/etc"}, expect="(input|model):"),
    Case("base-model-abs-dotdot", "traversal", change={"base_model": "/runpod-volume/../etc"}, contains="'..'"),
    Case("base-model-jobs-folder", "traversal", change={"base_model": "{volume}/jobs/planted"},
         files={"jobs/planted/config.json": b'{"model_type": "llama"}'}, expect="(input|model):"),
    Case("base-model-link-out", "links", change={"base_model": "linked"}, links={"models/linked": "{outside}"},
         expect="(input|model):"),
    Case("output-prefix-dotdot", "traversal", change={"output": {"prefix": "../../etc"}}, contains="prefix"),
    Case("output-prefix-backslash", "traversal", change={"output": {"prefix": "..\\..\\etc"}}, contains="prefix"),
    # ---- huge nesting ------------------------------------------------------------------------
    Case("metadata-deep-1000", "nesting", change={"metadata": deep(1000)}),
    Case("metadata-deep-100000", "nesting", change={"metadata": deep(100_000)}),
    Case("records-deep", "nesting", change={"dataset": {"records": [{"text": deep(5000)}]}},
         contains="nested too deeply"),
    Case("file-line-deep", "nesting", change=ds("datasets/deep.jsonl"),
         files={"datasets/deep.jsonl": b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n"},
         expect="dataset:", contains="nested too deeply"),
    # ---- unicode tricks ----------------------------------------------------------------------
    Case("job-id-rtl-override", "unicode", change={"job_id": "job\u202egpj.exe"}, contains="job_id"),
    Case("job-id-zero-width", "unicode", change={"job_id": "job\u200b1"}, contains="job_id"),
    Case("job-id-nul", "unicode", change={"job_id": "job\x001"}, contains="job_id"),
    Case("key-homoglyph", "unicode", change=hp(**{"\u0435pochs": 3}), contains="epochs"),
    Case("base-model-fullwidth", "unicode", change={"base_model": "ｏｒｇ/ｍｏｄｅｌ"}, contains="base_model"),
    Case("dataset-path-nul", "unicode", change=ds("datasets/capitals.jsonl\x00.txt"), expect="(input|dataset):"),
    Case("lone-surrogate", "unicode", change={"metadata": {"x": "\ud800"}, "job_id": "a\ud800"}, contains="job_id"),
    # ---- oversized strings -------------------------------------------------------------------
    Case("job-id-10k", "oversized", change={"job_id": "a" * 10_000}, contains="job_id"),
    Case("base-model-1mb", "oversized", change={"base_model": "org/" + "m" * (1 << 20)}, contains="base_model"),
    Case("dataset-uri-1mb", "oversized", change=ds("https://example.com/" + "a" * (1 << 20)), expect="(input|dataset):"),
    Case("prefix-1mb", "oversized", change={"output": {"prefix": "p" * (1 << 20)}}, contains="prefix"),
    Case("target-modules-10k", "oversized", change=hp(target_modules=["q_proj"] * 10_000), expect="(input|model|dataset):"),
    # ---- dataset files -----------------------------------------------------------------------
    Case("file-dictionary-bomb", "finding-9", change=ds("datasets/bomb.parquet"),
         files={"datasets/bomb.parquet": Path("dictionary-bomb.parquet")}, expect="dataset:",
         contains="decodes to more than 100 times"),
    Case("file-gzip-newlines", "finding-9", change=ds("datasets/blank.jsonl.gz"), env={"MAX_DATASET_BYTES": str(32 << 20)},
         files={"datasets/blank.jsonl.gz": Path("newlines-64mib.jsonl.gz")}, expect="dataset:",
         contains="decompresses to more than the 33554432-byte cap"),
    Case("file-too-many-records", "finding-9", change=ds("datasets/many.jsonl"), env={"MAX_DATASET_RECORDS": "100"},
         files={"datasets/many.jsonl": b'{"text": "r"}\n' * 500}, expect="dataset:", contains="MAX_DATASET_RECORDS"),
    Case("file-truncated-parquet", "files", change=ds("datasets/t.parquet"),
         files={"datasets/t.parquet": Path("truncated.parquet")}, expect="dataset:", contains="not a readable Parquet"),
    Case("file-fake-parquet", "files", change=ds("datasets/f.parquet"), files={"datasets/f.parquet": b"hello"},
         expect="dataset:", contains="not a Parquet file"),
    Case("file-fake-gzip", "files", change=ds("datasets/f.jsonl.gz"), files={"datasets/f.jsonl.gz": b"\x1f\x8bnot gzip"},
         expect="dataset:", contains="gzip"),
    Case("file-empty", "files", change=ds("datasets/e.jsonl"), files={"datasets/e.jsonl": b""}, expect="dataset:",
         contains="empty"),
    Case("file-blank", "files", change=ds("datasets/b.jsonl"), files={"datasets/b.jsonl": b"\n \n\t\n"},
         expect="dataset:", contains="empty"),
    Case("file-binary", "files", change=ds("datasets/bin"), files={"datasets/bin": bytes(range(256)) * 8},
         expect="dataset:"),
    Case("file-utf16", "files", change=ds("datasets/u.jsonl"), files={"datasets/u.jsonl": '{"text": "a"}\n'.encode("utf-16")},
         expect="dataset:"),
    Case("file-bad-utf8", "files", change=ds("datasets/u8.jsonl"), files={"datasets/u8.jsonl": b'{"text": "\xff\xfe"}\n'},
         expect="dataset:", contains="not UTF-8"),
    Case("file-json-object", "files", change=ds("datasets/o.json"), files={"datasets/o.json": b'{"rows": []}'},
         expect="dataset:", contains="not an array of records"),
    Case("file-csv-ragged", "files", change=ds("datasets/r.csv"), files={"datasets/r.csv": b"prompt,completion\na,b,c\n"},
         expect="dataset:", contains="fields"),
    Case("file-html", "files", change=ds("datasets/page.jsonl"), files={"datasets/page.jsonl": b"<html></html>"},
         expect="dataset:"),
    Case("file-nul-bytes", "files", change=ds("datasets/n.jsonl"), files={"datasets/n.jsonl": b'{"text": "a"}\x00\x00\n'},
         expect="dataset:"),
    Case("folder-without-data", "files", change=ds("datasets/emptydir"), files={"datasets/emptydir/.keep": b""},
         expect="dataset:", contains="holds no data files"),
    Case("all-weights-zero", "finding-11", change={"dataset": {"records": [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}]}},
         expect="dataset:", contains="give at least one assistant turn"),
    Case("over-dataset-bytes", "files", change=ds("datasets/capitals.jsonl"), env={"MAX_DATASET_BYTES": "10"},
         expect="dataset:", contains="MAX_DATASET_BYTES"),
    # ---- models ------------------------------------------------------------------------------
    Case("model-missing-offline", "model", change={"base_model": "org/not-cached"}, expect="model:"),
    Case("model-folder-missing", "model", change={"base_model": "no-such-folder"}, expect="(input|model):"),
    Case("model-broken-tokenizer", "finding-11", change={"base_model": "brokentok"}, files={
        "models/brokentok": "copy:tiny-llama", "models/brokentok/tokenizer.json": b"{broken"}, expect="model:",
         contains="tokenizer.json is damaged"),
    Case("model-broken-config", "finding-11", change={"base_model": "brokencfg"}, files={
        "models/brokencfg": "copy:tiny-llama", "models/brokencfg/config.json": b"{broken"}, expect="model:",
         contains="config.json"),
    Case("environment-invalid", "settings", env={"MAX_DATASET_BYTES": "lots"}, contains="max_dataset_bytes"),
    Case("environment-s3-half", "settings", env={"S3_BUCKET": "b"}, expect="upload:", contains="half-configured"),
]
assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def redirector():
    server = start_file_server()
    _route(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def warm():
    """What a warm worker has imported already: the 3 s bound is on the job, not on importing torch."""
    from transformers import AutoTokenizer  # noqa: F401

    import dataset_loader  # noqa: F401
    import pipeline  # noqa: F401
    import train_lora  # noqa: F401


def _figures() -> dict:
    return {"cases": 0, "errors": 0, "secrets_leaked": 0, "tracebacks": 0, "weights_loaded": 0,
            "connections_beyond_loopback": 0, "places_scanned": 0, "max_seconds": 0.0}


@pytest.fixture(scope="module")
def tally():
    """The corpus's figures; cases of findings still open (strict xfail) are counted apart."""
    figures = {"closed": _figures(), "open": _figures()}
    yield figures
    count("corpus", **figures["closed"], secrets_planted=len(PLANTED.values()))
    count("corpus_open_findings", **figures["open"])


def _prepare(case: Case, volume: Path, outside: Path) -> None:
    for rel, body in case.files.items():
        target = volume / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(body, str) and body.startswith("copy:"):
            shutil.copytree(volume / "models" / body[5:], target, dirs_exist_ok=True)
        elif isinstance(body, Path):
            shutil.copyfile(CORPUS / body, target)
        else:
            target.write_bytes(body)
    for rel, target in case.links.items():
        (volume / rel).parent.mkdir(parents=True, exist_ok=True)
        (volume / rel).symlink_to(outside if target == "{outside}" else target)


def _job(case: Case, volume: Path, redirector) -> dict:
    if case.job is not None:
        return case.job
    if case.input is not None:
        return {"id": f"corpus-{case.id}", "input": case.input}
    job = small_job(action="validate")
    job.update(case.change)
    return {"id": f"corpus-{case.id}", "input": _fill(job, redirector.url(""), str(volume))}


def _fill(value, redirector: str, volume: str, depth: int = 0):
    """Placeholders in the top levels of a job (deeply nested cases stay as built, unwalked)."""
    if isinstance(value, str):
        return value.replace(RED, redirector).replace("{volume}", volume)
    if isinstance(value, dict) and depth < 3:
        return {k: _fill(v, redirector, volume, depth + 1) for k, v in value.items()}
    return value


def _marks(case: Case):
    if case.needs:
        return [pytest.mark.xfail(strict=True, reason=f"open: closed by {case.needs} (issue 13)")]
    return []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_corpus(case, volume, tmp_path, monkeypatch, caplog, redirector, loopback_only, tally, warm):  # noqa: F811
    import train_lora
    from data import http

    weights = []
    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: weights.append(1) or pytest.fail("weights"))
    plant_environment(monkeypatch)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    handler.get_settings.cache_clear()
    # The redirector's own address (and only its port) passes the address check; where it points does not.
    real_resolve = http._resolve_host
    monkeypatch.setattr(http, "_resolve_host", lambda host, port, rules, shown: ["127.0.0.1"]
                        if (host, port) == ("127.0.0.1", redirector.port) else real_resolve(host, port, rules, shown))
    outside = tmp_path / "outside-secret"
    outside.mkdir()
    (outside / "config.json").write_text('{"model_type": "llama", "secret": "outside-the-volume"}')
    outside_file = tmp_path / "outside.jsonl"
    outside_file.write_text('{"text": "outside-the-volume"}\n')
    _prepare(case, volume, outside_file if case.id.startswith("dataset") else outside)
    caplog.set_level("DEBUG")
    # As configure_logging filters every handler. pytest keeps one capture handler for the whole run:
    # the filter comes off again, or every later test would scrub through all the earlier ones.
    scrubber = ScrubFilter([PLANTED.hf_token])
    caplog.handler.addFilter(scrubber)
    try:
        started = time.monotonic()
        output = handler.handler(_job(case, volume, redirector))
        seconds = time.monotonic() - started
    finally:
        caplog.handler.removeFilter(scrubber)

    error = output.get("error", "") if isinstance(output, dict) else ""
    leaks = scan({"output": json.dumps(output), "log": caplog.text, **volume_texts(volume)})
    tally = tally["open" if case.needs else "closed"]
    tally["cases"] += 1
    tally["errors"] += bool(error)
    tally["secrets_leaked"] += len(leaks)
    tally["tracebacks"] += "Traceback" in error or 'File "' in error
    tally["weights_loaded"] += len(weights)
    tally["connections_beyond_loopback"] += len(loopback_only.blocked)
    tally["places_scanned"] += 2 + len(volume_texts(volume))
    tally["max_seconds"] = max(tally["max_seconds"], round(seconds, 3))

    assert isinstance(output, dict) and list(output) == ["error"], output

    assert re.match(case.expect, error), error
    if case.contains:
        assert re.search(case.contains, error), error
    assert "Traceback" not in error and 'File "' not in error and "outside-the-volume" not in error
    assert not leaks, leaks
    assert not loopback_only.blocked, loopback_only.blocked
    assert seconds < SECONDS, f"{seconds:.2f}s"


def _route(server) -> None:
    """/to?u=URL redirects to URL; /loop to itself; /nowhere answers 302 without a Location."""
    from urllib.parse import parse_qs, urlsplit

    server.redirects["/loop"] = "/loop"
    server.statuses["/nowhere"] = 302
    original = server.httpd.RequestHandlerClass.do_GET

    def do_get(self):
        parts = urlsplit(self.path)
        if parts.path == "/to":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["u"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        original(self)

    server.httpd.RequestHandlerClass.do_GET = do_get


def test_the_corpus_is_large_and_covers_every_class():
    classes = {c.klass for c in CASES}
    assert len(CASES) >= 100, len(CASES)
    assert {"malformed", "types", "url", "redirect", "traversal", "links", "nesting", "unicode", "oversized",
            "secrets", "files", "finding-9", "finding-11"} <= classes, classes


def test_a_successful_job_leaks_no_planted_secret(volume, monkeypatch, caplog, tally):
    """The secrets scan on the success path: a real (tiny) training job with the worker's HF token in
    the environment and a signed dataset URL (its token in the query) in the payload. Nothing the job
    returns, logs, records or writes on the volume (adapter, manifest, metrics, job folder) holds one."""
    server = start_file_server()
    try:
        server.files["/object/sign/train.jsonl"] = (volume / "datasets" / "capitals.jsonl").read_bytes()
        plant_environment(monkeypatch)
        monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")  # the dataset server is on loopback
        handler.get_settings.cache_clear()
        url = server.url(f"/object/sign/train.jsonl?token={PLANTED.url_token}")
        job = small_job(dataset={"uri": url, "max_examples": 16}, hyperparameters={"epochs": 1},
                        metadata={"user_id": "u1"})
        caplog.set_level("DEBUG")
        scrubber = ScrubFilter([PLANTED.hf_token])  # as configure_logging filters every handler
        caplog.handler.addFilter(scrubber)
        try:
            output = handler.handler({"id": "secrets-ok", "input": job})
        finally:
            caplog.handler.removeFilter(scrubber)
    finally:
        server.stop()
    assert output.get("status") == "succeeded", output
    assert server.requests and PLANTED.url_token in server.requests[0][1]  # the token really was used
    places = {"output": json.dumps(output), "log": caplog.text, **volume_texts(volume)}
    assert any(name.startswith("artifacts") for name in places) and any(".sqlite3:" in n for n in places)
    leaks = scan(places)
    tally = tally["closed"]
    tally["secrets_leaked"] += len(leaks)
    tally["places_scanned"] += len(places)
    tally["successful_jobs_scanned"] = tally.get("successful_jobs_scanned", 0) + 1
    assert not leaks, leaks
