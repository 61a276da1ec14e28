"""Dataset sources against real servers on loopback: http(s) (tests/http_server.py) and S3 (SeaweedFS).

The URL checks (private, loopback, link-local addresses; redirects; size caps while streaming) run
against the same real server, with ALLOW_PRIVATE_URLS switched on where the test needs to reach it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket

import pytest

import handler
from config.job import DatasetSpec, TrainingJob
from config.settings import WorkerSettings
from data.http import check_address, display_url
from dataset_loader import read_dataset
from errors import DatasetError, InputError
from tests.conftest import small_job
from tests.http_server import start_file_server

ROWS = [{"prompt": f"Capital {i}?", "completion": f"City {i}."} for i in range(6)]
JSONL = "\n".join(json.dumps(r) for r in ROWS).encode() + b"\n"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ1cmwiOiJkYXRhc2V0cy90cmFpbi5qc29ubCJ9.c2lnbmF0dXJlc2VjcmV0"
SIGNED = "/storage/v1/object/sign/datasets/train.jsonl"


@pytest.fixture
def http_server():
    server = start_file_server()
    yield server
    server.stop()


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    server = start_file_server(tls_folder=tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))  # trust the test CA, as a private CA is trusted
    yield server
    server.stop()


@pytest.fixture
def open_settings(volume) -> WorkerSettings:
    """Settings that may reach the loopback test servers."""
    return WorkerSettings(allow_private_urls=True)


def read(uri: str, settings: WorkerSettings, **spec):
    return read_dataset(DatasetSpec(uri=uri, **spec), settings, seed=0)


# --------------------------------------------------------------------------------------------------
# http(s)


def test_https_signed_url_is_fetched_and_its_token_never_shown(https_server, open_settings, caplog):
    https_server.files[SIGNED] = JSONL
    url = https_server.url(f"{SIGNED}?token={TOKEN}")
    caplog.set_level("INFO")  # handler.configure_logging keeps urllib3 (which logs paths) at WARNING
    raw = read(url, open_settings)
    assert [ex.completion for ex in raw.train] == [r["completion"] for r in ROWS]
    report = raw.report
    assert report.sha256 == hashlib.sha256(JSONL).hexdigest() and report.bytes == len(JSONL)
    assert report.source == https_server.url(SIGNED) and report.file_format == "jsonl"
    # The server got the token; nothing the worker reports or logs repeats it.
    assert https_server.requests[0][1] == f"{SIGNED}?token={TOKEN}"
    assert TOKEN not in json.dumps(report.to_dict()), report.to_dict()
    assert "token=" not in caplog.text


def test_https_by_host_name_verifies_the_certificate(https_server, open_settings, monkeypatch):
    https_server.files["/train.jsonl"] = JSONL
    assert len(read(https_server.url("/train.jsonl", host="localhost"), open_settings).train) == 6
    monkeypatch.delenv("SSL_CERT_FILE")
    import certifi

    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())  # a store without the test CA
    with pytest.raises(DatasetError, match="TLS verification failed"):
        read(https_server.url("/train.jsonl"), open_settings)


def test_http_url_and_redirects_are_followed(http_server, open_settings):
    # Compressed once: gzip stamps the current second into its header, so a second call can differ.
    body = gzip.compress(JSONL)
    http_server.files["/data/train.jsonl.gz"] = body
    http_server.redirects["/latest"] = "/hop"
    http_server.redirects["/hop"] = "/data/train.jsonl.gz"
    raw = read(http_server.url("/latest"), open_settings)
    assert len(raw.train) == 6 and raw.report.file_format == "jsonl.gz"
    assert [r[1] for r in http_server.requests] == ["/latest", "/hop", "/data/train.jsonl.gz"]
    assert raw.report.sha256 == hashlib.sha256(body).hexdigest()


def test_the_file_kind_comes_from_the_final_url_or_content_disposition(http_server, open_settings):
    csv_body = b"prompt,completion\nQ1?,A1.\nQ2?,A2.\n"
    http_server.files["/exports/train.csv"] = csv_body
    http_server.redirects["/download"] = "/exports/train.csv"
    http_server.files["/blob/42"] = csv_body
    http_server.headers["/blob/42"] = {"Content-Disposition": 'attachment; filename="train.csv"'}
    for path in ("/download", "/blob/42"):
        raw = read(http_server.url(path), open_settings)
        assert raw.report.file_format == "csv" and [ex.completion for ex in raw.train] == ["A1.", "A2."]


def test_a_redirect_is_checked_like_the_first_url(http_server, open_settings):
    http_server.redirects["/to-metadata"] = "http://169.254.169.254/latest/meta-data/"
    http_server.redirects["/to-file"] = "file:///etc/passwd"
    http_server.redirects["/loop"] = "/loop"
    with pytest.raises(DatasetError, match=r"169\.254\.169\.254, a link-local address"):
        read(http_server.url("/to-metadata"), open_settings)
    with pytest.raises(DatasetError, match="only http:// and https:// URLs are fetched, not file"):
        read(http_server.url("/to-file"), open_settings)
    with pytest.raises(DatasetError, match="more than 5 redirects"):
        read(http_server.url("/loop"), open_settings)


@pytest.mark.parametrize("host,kind", [
    ("127.0.0.1", "a loopback address"),
    ("localhost", "a loopback address"),
    ("[::1]", "a loopback address"),
    ("10.1.2.3", "a private-network address"),
    ("192.168.0.10", "a private-network address"),
    ("100.64.0.1", "a private-network address"),
    ("[::ffff:127.0.0.1]", "a loopback address"),
])
def test_private_addresses_are_refused_without_the_switch(http_server, settings, host, kind):
    http_server.files["/train.jsonl"] = JSONL
    with pytest.raises(DatasetError) as info:
        read(http_server.url("/train.jsonl", host=host), settings)
    assert f"{kind}; set ALLOW_PRIVATE_URLS=true" in str(info.value)
    assert str(info.value).endswith("Datasets are fetched from public addresses only")
    assert http_server.requests == []  # refused before connecting


def test_link_local_is_refused_even_with_the_switch(open_settings):
    for address in ("169.254.169.254", "fe80::1", "fd00:ec2::254"):
        assert "link-local" in check_address(address, open_settings.allow_private_urls)
    assert check_address("10.0.0.1", open_settings.allow_private_urls) is None
    assert check_address("8.8.8.8", WorkerSettings().allow_private_urls) is None


def test_every_resolved_address_is_checked(settings, monkeypatch):
    # DNS is the one thing no loopback server can stand in for: a name that resolves to a public
    # and a private address must be refused as a whole.
    def two_answers(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)
    with pytest.raises(DatasetError, match=r"https://data\.example\.com/t\.jsonl points at 10\.0\.0\.7"):
        read("https://data.example.com/t.jsonl?sig=abc", settings)


@pytest.mark.parametrize("status,fragment,retryable", [
    (404, "answered 404 Not Found: the file is not there", False),
    (403, "answered 403 Forbidden: access denied; a signed URL may have expired", False),
    (503, "answered 503 Service Unavailable: the server failed; try again", True),
])
def test_http_errors_are_dataset_errors_without_the_query(http_server, open_settings, status, fragment,
                                                          retryable):
    http_server.statuses["/f.jsonl"] = status
    with pytest.raises(DatasetError) as info:
        read(http_server.url(f"/f.jsonl?token={TOKEN}"), open_settings)
    assert fragment in str(info.value) and info.value.retryable is retryable
    assert TOKEN not in str(info.value) and "?" not in str(info.value)


def test_a_missing_path_is_a_404(http_server, open_settings):
    with pytest.raises(DatasetError, match=r"/nothing\.jsonl answered 404"):
        read(http_server.url("/nothing.jsonl"), open_settings)


def test_size_cap_by_content_length_and_while_streaming(http_server, volume):
    settings = WorkerSettings(allow_private_urls=True, max_dataset_bytes=1 << 20)
    http_server.files["/big.jsonl"] = b"x" * ((1 << 20) + 1)
    with pytest.raises(DatasetError, match=r"is 1048577 bytes, over the 1048576-byte cap \(MAX_DATASET_BYTES\)"):
        read(http_server.url("/big.jsonl"), settings)
    # No Content-Length: the cap is found while streaming, long before the 256 MiB the server offers.
    http_server.streams["/endless.jsonl"] = (b"x" * 65536, 4096)
    with pytest.raises(DatasetError, match="is more than 1048576 bytes, over the 1048576-byte cap"):
        read(http_server.url("/endless.jsonl"), settings)
    assert http_server.sent["/endless.jsonl"] < 64 << 20


def test_an_html_page_is_not_a_dataset(http_server, open_settings):
    http_server.files["/share/abc"] = b"<html><body>Download</body></html>"
    http_server.content_types["/share/abc"] = "text/html; charset=utf-8"
    with pytest.raises(DatasetError, match="returned an HTML page, not a data file"):
        read(http_server.url("/share/abc"), open_settings)


def test_urls_with_credentials_and_other_schemes(settings):
    with pytest.raises(DatasetError, match="user name or password are refused"):
        read("https://user:pw@example.com/t.jsonl", settings)
    assert display_url("https://u:p@host:8443/a/b.jsonl?token=x#f") == "https://host:8443/a/b.jsonl"
    with pytest.raises(InputError, match="dataset.uri: scheme 'ftp://' is not supported"):
        TrainingJob.from_payload(small_job(dataset={"uri": "ftp://example.com/t.jsonl"}))


def test_a_url_to_a_private_address_fails_the_job_before_any_weight(http_server, volume, monkeypatch):
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    http_server.files["/t.jsonl"] = JSONL
    output = handler.handler({"id": "priv", "input": small_job(
        dataset={"uri": http_server.url(f"/t.jsonl?token={TOKEN}")})})
    assert output["error"].startswith(f"dataset: {http_server.url('/t.jsonl')} points at 127.0.0.1, a loopback")
    assert TOKEN not in output["error"]


def test_validate_action_over_https(https_server, volume, monkeypatch):
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    https_server.files[SIGNED] = JSONL
    output = handler.handler({"id": "v", "input": small_job(action="validate", dataset_url=https_server.url(
        f"{SIGNED}?token={TOKEN}"), dataset=None)})
    assert output["status"] == "valid", output
    assert output["dataset"]["examples"] == 6 and output["dataset"]["formats"] == {"prompt_completion": 6}
    assert TOKEN not in json.dumps(output)


# --------------------------------------------------------------------------------------------------
# s3


@pytest.fixture
def s3_settings(s3_server, s3_bucket, volume, monkeypatch) -> WorkerSettings:
    for key, value in s3_server.env(s3_bucket).items():
        monkeypatch.setenv(key, value)
    return WorkerSettings()


def test_s3_object_is_fetched(s3_server, s3_bucket, s3_settings):
    body = gzip.compress(JSONL)
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/train.jsonl.gz", Body=body)
    raw = read(f"s3://{s3_bucket}/data/train.jsonl.gz", s3_settings, eval_fraction=0.5)
    assert (len(raw.train), len(raw.eval)) == (3, 3)
    assert raw.report.sha256 == hashlib.sha256(body).hexdigest() and raw.report.bytes == len(body)
    assert raw.report.source == f"s3://{s3_bucket}/data/train.jsonl.gz"


def test_s3_missing_object_bucket_and_cap(s3_server, s3_bucket, s3_settings):
    with pytest.raises(DatasetError, match=f"s3://{s3_bucket}/nope.jsonl does not exist"):
        read(f"s3://{s3_bucket}/nope.jsonl", s3_settings)
    with pytest.raises(DatasetError, match="s3://no-such-bucket-here/t.jsonl"):
        read("s3://no-such-bucket-here/t.jsonl", s3_settings)
    s3_server.client().put_object(Bucket=s3_bucket, Key="big.jsonl", Body=b"{}\n" * 400)
    small = s3_settings.model_copy(update={"max_dataset_bytes": 1000})
    with pytest.raises(DatasetError, match="is 1200 bytes, over the 1000-byte cap"):
        read(f"s3://{s3_bucket}/big.jsonl", small)
    with pytest.raises(DatasetError, match="must name an object"):
        read(f"s3://{s3_bucket}/", s3_settings)


def test_s3_without_settings_says_which_to_set(settings):
    with pytest.raises(DatasetError, match="set S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"):
        read("s3://bucket/train.jsonl", settings)


# --------------------------------------------------------------------------------------------------
# hf:// against a local Hub (tests/hub_server.py, the `hub` fixture)


def _parquet(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def _rows(tag, n):
    return [{"prompt": f"{tag} question {i}?", "completion": f"{tag} answer {i}."} for i in range(n)]


CARD = b"""---
license: mit
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: en/train-*
  - split: test
    path: en/test.jsonl
- config_name: fr
  data_files:
  - split: train
    path: fr/train.jsonl
  - split: test
    path: fr/test.jsonl
---
# A dataset
"""


@pytest.fixture
def dataset_hub(hub):
    hub.add_repo("acme/capitals", {
        "README.md": CARD,
        "en/train-00000-of-00002.parquet": _parquet(_rows("en0", 3)),
        "en/train-00001-of-00002.parquet": _parquet(_rows("en1", 2)),
        "en/test.jsonl": JSONL,
        "fr/train.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in _rows("fr", 4)),
        "fr/test.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in _rows("fr-test", 2)),
        ".gitattributes": b"*.parquet filter=lfs\n",
    }, repo_type="dataset")
    hub.add_repo("acme/plain", {
        "data/train-00000-of-00002.parquet": _parquet(_rows("a", 2)),
        "data/train-00001-of-00002.parquet": _parquet(_rows("b", 2)),
        "data/validation-00000-of-00001.parquet": _parquet(_rows("v", 1)),
        "extra/notes.jsonl": b'{"text": "notes"}\n',
    }, repo_type="dataset")
    return hub


def test_hf_dataset_default_subset_and_its_shards(dataset_hub, volume):
    settings = WorkerSettings()
    raw = read("hf://acme/capitals", settings)
    assert [ex.prompt for ex in raw.train] == [r["prompt"] for r in _rows("en0", 3) + _rows("en1", 2)]
    assert raw.report.source == "hf://acme/capitals (en, train)"
    assert raw.train[3].where == "hf://acme/capitals/en/train-00001-of-00002.parquet record 1"
    assert sorted(dataset_hub.downloads()) == ["README.md", "en/train-00000-of-00002.parquet",
                                       "en/train-00001-of-00002.parquet"]
    snapshot = volume / "huggingface-cache" / "hub" / "datasets--acme--capitals" / "snapshots"
    assert [p.name for p in snapshot.iterdir()] == [dataset_hub.repos[("dataset", "acme/capitals")].sha]


def test_hf_subset_and_split_then_a_warm_cache_asks_nothing(dataset_hub, volume):
    settings = WorkerSettings()
    raw = read("hf://acme/capitals", settings, subset="fr", split="test")
    assert [ex.prompt for ex in raw.train] == [r["prompt"] for r in _rows("fr-test", 2)]
    assert "fr/train.jsonl" not in dataset_hub.downloads()
    body = dataset_hub.repos[("dataset", "acme/capitals")].files["fr/test.jsonl"]
    assert raw.report.sha256 == hashlib.sha256(body).hexdigest()
    asked = len(dataset_hub.requests)
    again = read("hf://acme/capitals", settings, subset="fr", split="test")
    assert len(dataset_hub.requests) == asked, dataset_hub.requests[asked:]  # offline first: the volume's cache answers
    assert again.report.sha256 == raw.report.sha256


def test_hf_splits_from_file_names(dataset_hub, volume):
    settings = WorkerSettings()
    assert [ex.prompt for ex in read("hf://acme/plain", settings).train] == [
        r["prompt"] for r in _rows("a", 2) + _rows("b", 2)]
    assert [ex.prompt for ex in read("hf://acme/plain", settings, split="validation").train] == ["v question 0?"]
    one = read("hf://datasets/acme/plain/extra/notes.jsonl", settings)
    assert [ex.text for ex in one.train] == ["notes"]


def test_hf_card_config_with_a_data_dir(dataset_hub, volume):
    dataset_hub.add_dataset("acme/dirs", {
        "README.md": b"---\nconfigs:\n- config_name: small\n  data_dir: small\n- config_name: big\n  data_dir: big\n---\n",
        "small/train.jsonl": JSONL, "small/test.jsonl": b'{"text": "small test"}\n',
        "big/train.jsonl": b'{"text": "big"}\n',
    })
    settings = WorkerSettings()
    assert [ex.text for ex in read("hf://acme/dirs", settings, subset="small", split="test").train] == ["small test"]
    assert len(read("hf://acme/dirs", settings, subset="small").train) == 6
    with pytest.raises(DatasetError, match="has several subsets \\(small, big\\); name one in 'subset'"):
        read("hf://acme/dirs", settings)


def test_hf_eval_uri_takes_the_validation_or_test_split(dataset_hub, volume):
    settings = WorkerSettings()
    raw = read_dataset(DatasetSpec(uri="hf://acme/plain", eval_uri="hf://acme/plain"), settings, seed=0)
    assert (len(raw.train), [ex.prompt for ex in raw.eval]) == (4, ["v question 0?"])
    raw = read_dataset(DatasetSpec(uri="hf://acme/capitals", subset="fr", eval_uri="hf://acme/capitals"),
                       settings, seed=0)
    assert [ex.prompt for ex in raw.eval] == [r["prompt"] for r in _rows("fr-test", 2)]
    assert raw.report.eval_source == "hf://acme/capitals (fr, test)"
    dataset_hub.add_dataset("acme/trainonly", {"train.jsonl": JSONL})
    with pytest.raises(DatasetError, match="hf://acme/trainonly has no validation or test split"):
        read_dataset(DatasetSpec(uri="hf://acme/trainonly", eval_uri="hf://acme/trainonly"), settings, seed=0)


@pytest.mark.parametrize("uri,spec,fragment", [
    ("hf://acme/capitals", {"subset": "de"}, "hf://acme/capitals has no subset 'de'; its subsets are: en, fr"),
    ("hf://acme/capitals", {"split": "validation"}, "subset 'en' has no split 'validation'; its splits are: train, test"),
    ("hf://acme/plain", {"split": "test"}, "hf://acme/plain has no split 'test'; splits found: train, validation"),
    ("hf://acme/nothing", {}, "hf://acme/nothing: no such dataset on the Hub (or it is private: set HF_TOKEN)"),
    ("hf://acme/capitals@v9", {}, "revision 'v9' does not exist"),
    ("hf://acme/plain/missing.jsonl", {}, "no data file at 'missing.jsonl'"),
    ("hf://acme", {}, "must name a dataset repo: hf://org/name"),
])
def test_hf_errors_name_what_exists(dataset_hub, volume, uri, spec, fragment):
    with pytest.raises(DatasetError) as info:
        read(uri, WorkerSettings(), **spec)
    assert fragment in str(info.value)


def test_hf_gated_needs_the_token(dataset_hub, volume, monkeypatch):
    dataset_hub.add_dataset("acme/gated", {"train.jsonl": JSONL}, gated=True)
    dataset_hub.token = "hf_testtokentesttokentesttoken01"
    with pytest.raises(DatasetError, match="hf://acme/gated is gated: accept its terms"):
        read("hf://acme/gated", WorkerSettings())
    monkeypatch.setenv("HF_TOKEN", dataset_hub.token)
    assert len(read("hf://acme/gated", WorkerSettings()).train) == 6


def test_hf_cap_is_checked_before_downloading(dataset_hub, volume):
    settings = WorkerSettings(max_dataset_bytes=1500)
    with pytest.raises(DatasetError, match=r"hf://acme/capitals \(en / train, 2 files\) is \d+ bytes, over the 1500-byte cap"):
        read("hf://acme/capitals", settings)
    assert not any(p.endswith(".parquet") for p in dataset_hub.downloads())


def test_hf_offline_with_a_cold_cache_says_so(dataset_hub, volume, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="is not in the Hugging Face cache on the volume .* HF_HUB_OFFLINE is set"):
        read("hf://acme/plain", WorkerSettings())
    assert dataset_hub.requests == []


# --------------------------------------------------------------------------------------------------
# bad data through the handler: a `dataset:` error, no weights loaded


BAD_DATA = [
    ("empty file", b"", {}, "dataset: datasets/bad.jsonl is empty (0 bytes)"),
    ("invalid JSON", b'{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', {},
     "dataset: datasets/bad.jsonl line 3 is not valid JSON (Expecting property name enclosed in double quotes"),
    ("missing columns", b'{"question": "q", "answer": "a"}\n', {},
     "dataset: 1 of 1 records in datasets/bad.jsonl are not usable — line 1: no known format; found columns "
     "['answer', 'question'], expected one of: chat (messages); sharegpt (conversations); prompt_completion "
     "(prompt + completion); alpaca (instruction + output (input optional)); text (text)"),
    ("wrong role", b'{"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     {}, "dataset: 1 of 1 records in datasets/bad.jsonl are not usable — line 1: turn 1 has role 'human'; roles "
         "are system, user, assistant"),
    ("empty completion", b'{"prompt": "q", "completion": ""}\n', {},
     "dataset: 1 of 1 records in datasets/bad.jsonl are not usable — line 1: has an empty completion"),
    ("over the cap", JSONL, {"MAX_DATASET_BYTES": "100"},
     f"dataset: dataset datasets/bad.jsonl is {len(JSONL)} bytes, over the 100-byte cap (MAX_DATASET_BYTES)"),
]


@pytest.mark.parametrize("name,body,env,expected", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_a_dataset_error_before_any_weight(volume, monkeypatch, name, body, env, expected):
    import train_lora
    from storage.records import SqliteRecords

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (volume / "datasets" / "bad.jsonl").write_bytes(body)
    output = handler.handler({"id": "bad", "input": small_job(dataset={"uri": "datasets/bad.jsonl"})})
    assert output == {"error": output["error"]} and output["error"].startswith(expected), output
    row = SqliteRecords(volume / "records.sqlite3").get_job("bad")
    assert (row["status"], row["stage"]) == ("failed", "dataset")


def test_url_errors_through_the_handler(http_server, volume, monkeypatch):
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    url = http_server.url(f"/gone.jsonl?token={TOKEN}")
    output = handler.handler({"id": "u1", "input": small_job(dataset={"uri": url}, action="validate")})
    assert output["error"] == (f"dataset: {http_server.url('/gone.jsonl')} points at 127.0.0.1, a loopback "
                               "address; set ALLOW_PRIVATE_URLS=true on the endpoint to allow it. Datasets are "
                               "fetched from public addresses only")
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "1")
    handler.get_settings.cache_clear()
    output = handler.handler({"id": "u2", "input": small_job(dataset={"uri": url}, action="validate")})
    assert output["error"].startswith(f"dataset: {http_server.url('/gone.jsonl')} answered 404 Not Found")
    assert TOKEN not in output["error"]


def test_cli_validate_prints_the_report(volume, tmp_path, capsys, monkeypatch):
    import cli
    import train_lora

    monkeypatch.setattr(train_lora, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    (volume / "datasets" / "train.csv").write_bytes(b"prompt,completion\nQ1?,A1.\nQ2?,A2.\nQ3?,A3.\nQ4?,A4.\n")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": small_job(dataset={"uri": "datasets/train.csv", "eval_fraction": 0.25})}))
    assert cli.main(["validate", "--input", str(job)]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = printed["dataset"]
    assert printed["status"] == "valid"
    assert (report["records"], report["examples"], report["eval_examples"]) == (4, 3, 1)
    assert report["file_format"] == "csv" and report["formats"] == {"prompt_completion": 4}
    assert report["sha256"] == hashlib.sha256((volume / "datasets" / "train.csv").read_bytes()).hexdigest()
