"""dataset_loader (first cut): records → input_ids + labels with the right tokens masked."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from config.job import DatasetSpec
from data.tokenize import IGNORE_INDEX
from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
from errors import DatasetError, InputError


@pytest.fixture
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.fixture
def plain_tokenizer(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    tok.chat_template = None
    return tok


def prepare(records, tokenizer, settings, max_seq_length=256, train_on_inputs=False, **spec):
    raw = read_dataset(DatasetSpec(records=records, **spec), settings, seed=0)
    return tokenize_dataset(raw, tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs)


def trained_text(prepared, tokenizer, row=0):
    ids, labels = prepared.train[row]["input_ids"], prepared.train[row]["labels"]
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_chat_trains_on_assistant_turns_only(tokenizer, settings):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And Chile?"},
        {"role": "assistant", "content": "Santiago."},
    ]}
    prepared = prepare([record], tokenizer, settings)
    assert trained_text(prepared, tokenizer) == "Lima.<|im_end|>\nSantiago.<|im_end|>\n"
    full = tokenizer.decode(prepared.train[0]["input_ids"])
    assert full == tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_chat_turn_weight_zero_is_not_trained(tokenizer, settings):
    record = {"messages": [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "bad answer", "weight": 0},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "good answer"},
    ]}
    assert trained_text(prepare([record], tokenizer, settings), tokenizer) == "good answer<|im_end|>\n"


def test_prompt_completion_uses_the_chat_template_when_there_is_one(tokenizer, settings):
    prepared = prepare([{"prompt": "Capital of Peru?", "completion": "Lima."}], tokenizer, settings)
    assert trained_text(prepared, tokenizer) == "Lima.<|im_end|>\n"
    assert tokenizer.decode(prepared.train[0]["input_ids"]).startswith("<|im_start|>user\nCapital of Peru?")


def test_prompt_completion_without_template_appends_eos(plain_tokenizer, settings):
    prepared = prepare([{"prompt": "Capital of Peru?", "completion": " Lima."}], plain_tokenizer, settings)
    ids = prepared.train[0]["input_ids"]
    assert ids[-1] == plain_tokenizer.eos_token_id and prepared.train[0]["labels"][-1] == ids[-1]
    assert trained_text(prepared, plain_tokenizer) == " Lima.<|im_end|>"


def test_train_on_inputs_trains_everything(tokenizer, settings):
    prepared = prepare([{"prompt": "Q?", "completion": "A."}], tokenizer, settings, train_on_inputs=True)
    assert IGNORE_INDEX not in prepared.train[0]["labels"]


def test_chat_without_template_uses_the_documented_default(plain_tokenizer, settings):
    prepared = prepare([{"messages": [{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}]}], plain_tokenizer, settings)
    assert plain_tokenizer.decode(prepared.train[0]["input_ids"]).startswith("<|im_start|>user\nHi<|im_end|>")


def test_other_schemas_are_normalized(tokenizer, settings):
    records = [
        {"instruction": "Name a colour", "input": "", "output": "Red."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"text": "Plain text to learn."},
    ]
    prepared = prepare(records, tokenizer, settings)
    assert prepared.report.formats == {"alpaca": 1, "sharegpt": 1, "text": 1}
    assert [trained_text(prepared, tokenizer, i) for i in range(3)] == [
        "Red.<|im_end|>\n", "Hello.<|im_end|>\n", "Plain text to learn.<|im_end|>"]


def test_truncation_and_dropping_are_reported(tokenizer, settings):
    long_prompt = "word " * 200
    records = [
        {"prompt": "Short?", "completion": "Yes."},
        {"prompt": "Q?", "completion": "answer " * 100},  # truncated, keeps some completion
        {"prompt": long_prompt, "completion": "lost"},  # the prompt alone fills the window
    ]
    prepared = prepare(records, tokenizer, settings, max_seq_length=64)
    report = prepared.report
    assert (report.examples, report.truncated) == (2, 2)
    assert report.dropped == {"no completion tokens within max_seq_length": 1}
    assert report.longest == 64
    assert report.tokens == sum(len(ids) for ids in prepared.train["input_ids"])
    assert report.trained_tokens == sum(l != IGNORE_INDEX for ls in prepared.train["labels"] for l in ls)


def test_eval_fraction_is_a_seeded_split(tokenizer, settings):
    records = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(20)]
    a = prepare(records, tokenizer, settings, eval_fraction=0.2)
    b = prepare(records, tokenizer, settings, eval_fraction=0.2)
    assert (a.report.examples, a.report.eval_examples) == (16, 4)
    assert a.eval["input_ids"] == b.eval["input_ids"]


def test_jsonl_file_on_the_volume(tokenizer, settings):
    prepared = tokenize_dataset(read_dataset(DatasetSpec(uri="datasets/capitals.jsonl"), settings, seed=0),
                                tokenizer, max_seq_length=256, train_on_inputs=False)
    assert prepared.report.examples == 96 and prepared.report.formats == {"chat": 96}
    assert len(prepared.report.sha256) == 64


@pytest.mark.parametrize("lines,fragments", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", completion: b}'], ["line 2", "not valid JSON"]),
    ([""], ["is empty"]),
    (['{"question": "a", "answer": "b"}'], ["line 1", "found columns ['answer', 'question']", "messages"]),
    (['{"messages": [{"role": "bot", "content": "x"}]}'], ["line 1", "role 'bot'", "system, user, assistant"]),
    (['{"prompt": "a", "completion": "  "}'], ["line 1", "empty completion"]),
    (['{"messages": [{"role": "user", "content": "only a question"}]}'], ["no non-empty assistant turn"]),
])
def test_bad_files_say_where(settings, lines, fragments):
    (settings.volume_root / "datasets" / "bad.jsonl").write_text("\n".join(lines))
    with pytest.raises(DatasetError) as info:
        read_dataset(DatasetSpec(uri="datasets/bad.jsonl"), settings, seed=0)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_file_and_paths_outside_the_volume(settings):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(DatasetSpec(uri="datasets/nope.jsonl"), settings, seed=0)
    for uri in ("../../etc/passwd", "/etc/passwd"):
        with pytest.raises(InputError, match="outside the allowed folders"):
            read_dataset(DatasetSpec(uri=uri), settings, seed=0)


def test_format_named_but_columns_missing(settings):
    spec = DatasetSpec(records=[{"text": "x"}], format="chat")
    with pytest.raises(DatasetError, match="format 'chat' needs messages; found columns \\['text'\\]"):
        read_dataset(spec, settings, seed=0)


# --------------------------------------------------------------------------------------------------
# loss masks, token by token


def labelled(prepared, row=0):
    ids, labels = prepared.train[row]["input_ids"], prepared.train[row]["labels"]
    assert all(l == IGNORE_INDEX or l == t for t, l in zip(ids, labels)), "a label differs from its token"
    return [i for i, l in enumerate(labels) if l != IGNORE_INDEX]


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_chat_labels_sit_exactly_on_the_assistant_turns(tokenizer, settings):
    messages = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
        {"role": "assistant", "content": "Santiago."},
    ]
    prepared = prepare([{"messages": messages}], tokenizer, settings)
    render = lambda upto, gen: tokenizer.apply_chat_template(messages[:upto], tokenize=False,  # noqa: E731
                                                             add_generation_prompt=gen)
    first = range(n_tokens(tokenizer, render(2, True)), n_tokens(tokenizer, render(3, False)))
    second = range(n_tokens(tokenizer, render(4, True)), n_tokens(tokenizer, render(5, False)))
    assert labelled(prepared) == [*first, *second]
    assert len(prepared.train[0]["input_ids"]) == second.stop  # the template's <|im_end|> ends it: no extra EOS
    # With train_on_inputs every position carries its label.
    everything = prepare([{"messages": messages}], tokenizer, settings, train_on_inputs=True)
    assert labelled(everything) == list(range(second.stop))


def test_prompt_completion_labels_without_a_template(plain_tokenizer, settings):
    prepared = prepare([{"prompt": "Capital of Peru?", "completion": " Lima."}], plain_tokenizer, settings)
    ids = prepared.train[0]["input_ids"]
    start = n_tokens(plain_tokenizer, "Capital of Peru?")
    assert labelled(prepared) == list(range(start, len(ids)))
    assert len(ids) == n_tokens(plain_tokenizer, "Capital of Peru? Lima.") + 1  # + EOS
    assert ids[-1] == plain_tokenizer.eos_token_id


def test_default_template_appends_eos_when_the_tokenizer_stops_on_another_token(plain_tokenizer, settings):
    plain_tokenizer.eos_token = "<|endoftext|>"
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    prepared = prepare([record], plain_tokenizer, settings)
    ids = prepared.train[0]["input_ids"]
    assert ids[-1] == plain_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert prepared.train[0]["labels"][-1] == ids[-1]
    assert trained_text(prepared, plain_tokenizer).endswith("Hello<|im_end|>\n<|endoftext|>")


def test_all_turns_weighted_zero_is_dropped_with_its_place(tokenizer, settings):
    records = [
        {"prompt": "Q", "completion": "A"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0}]},
    ]
    prepared = prepare(records, tokenizer, settings)
    assert prepared.report.examples == 1
    assert prepared.report.dropped == {"every assistant turn has weight 0": 1}
    assert prepared.report.dropped_examples == [{"where": "record 2", "reason": "every assistant turn has weight 0"}]


def test_chat_content_parts_and_developer_role(tokenizer, settings):
    record = {"messages": [{"role": "developer", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "Capital "},
                                                        {"type": "text", "text": "of Peru?"}]},
                           {"role": "assistant", "content": "Lima."}]}
    prepared = prepare([record], tokenizer, settings)
    assert tokenizer.decode(prepared.train[0]["input_ids"]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru?<|im_end|>")


# --------------------------------------------------------------------------------------------------
# file formats


ROWS = [{"prompt": f"Capital {i}?", "completion": f"City {i}.", "id": i} for i in range(6)]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows, delimiter=","):
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return out.getvalue().encode()


def _parquet(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


FILE_CASES = [
    ("train.jsonl", lambda: _jsonl(ROWS), "jsonl"),
    ("train.ndjson", lambda: _jsonl(ROWS), "jsonl"),
    ("train.jsonl.gz", lambda: gzip.compress(_jsonl(ROWS)), "jsonl.gz"),
    ("train-no-extension", lambda: gzip.compress(_jsonl(ROWS)), "jsonl.gz"),  # by magic bytes
    ("plain-no-extension", lambda: _jsonl(ROWS), "jsonl"),  # sniffed
    ("train.json", lambda: json.dumps(ROWS, indent=2).encode(), "json"),
    ("named.json", lambda: _jsonl(ROWS), "jsonl"),  # JSONL in a .json file
    ("train.json.gz", lambda: gzip.compress(json.dumps(ROWS).encode()), "json.gz"),
    ("train.csv", lambda: _csv(ROWS), "csv"),
    ("train.tsv", lambda: _csv(ROWS, "\t"), "tsv"),
    ("train.csv.gz", lambda: gzip.compress(_csv(ROWS)), "csv.gz"),
    ("train.parquet", lambda: _parquet(ROWS), "parquet"),
    ("parquet-named.jsonl", lambda: _parquet(ROWS), "parquet"),  # the magic wins over the name
]


@pytest.mark.parametrize("name,make,file_format", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_every_file_format_gives_the_same_examples(settings, tokenizer, name, make, file_format):
    body = make()
    (settings.volume_root / "datasets" / name).write_bytes(body)
    raw = read_dataset(DatasetSpec(uri=f"datasets/{name}"), settings, seed=0)
    assert [(ex.prompt, ex.completion) for ex in raw.train] == [(r["prompt"], r["completion"]) for r in ROWS]
    report = raw.report
    assert report.file_format == file_format and report.records == 6
    assert report.sha256 == hashlib.sha256(body).hexdigest() and report.bytes == len(body)
    unit = "line" if file_format.split(".")[0] in ("jsonl", "csv", "tsv") else "record"
    first_line = 2 if file_format.startswith(("csv", "tsv")) else 1
    assert raw.train[0].where == f"{unit} {first_line}"
    assert tokenize_dataset(raw, tokenizer, max_seq_length=64, train_on_inputs=False).report.examples == 6


CHATS = [
    {"messages": [{"role": "user", "content": "Capital of Peru?"},
                  {"role": "assistant", "content": "Wrong.", "weight": 0},
                  {"role": "user", "content": "Try again."},
                  {"role": "assistant", "content": "Lima."}]},
    {"messages": [{"role": "user", "content": "Capital of Chile?"}, {"role": "assistant", "content": "Santiago."}]},
]


@pytest.mark.parametrize("name,make", [("chat.parquet", lambda: _parquet(CHATS)), ("chat.csv", lambda: _csv(CHATS))])
def test_chat_in_parquet_and_csv(settings, tokenizer, name, make):
    # Parquet unifies the turns' struct: the second record's turns get weight null, meaning 1.
    (settings.volume_root / "datasets" / name).write_bytes(make())
    raw = read_dataset(DatasetSpec(uri=f"datasets/{name}"), settings, seed=0)
    prepared = tokenize_dataset(raw, tokenizer, max_seq_length=256, train_on_inputs=False)
    assert [trained_text(prepared, tokenizer, i) for i in range(2)] == ["Lima.<|im_end|>\n", "Santiago.<|im_end|>\n"]


def test_sharegpt_alpaca_and_text_in_parquet(settings, tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    (settings.volume_root / "datasets" / "sg.parquet").write_bytes(_parquet(rows))
    alpaca = [{"instruction": "Name a colour", "input": None, "output": "Red."}]
    (settings.volume_root / "datasets" / "alpaca.parquet").write_bytes(_parquet(alpaca))
    for name, text in (("sg.parquet", "Hello.<|im_end|>\n"), ("alpaca.parquet", "Red.<|im_end|>\n")):
        raw = read_dataset(DatasetSpec(uri=f"datasets/{name}"), settings, seed=0)
        assert trained_text(tokenize_dataset(raw, tokenizer, max_seq_length=64, train_on_inputs=False),
                            tokenizer) == text


def test_a_folder_of_shards_is_read_in_order(settings):
    folder = settings.volume_root / "datasets" / "shards"
    folder.mkdir()
    (folder / "train-00001-of-00002.parquet").write_bytes(_parquet(ROWS[3:]))
    (folder / "train-00000-of-00002.parquet").write_bytes(_parquet(ROWS[:3]))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk.jsonl").write_text("not json\n")
    raw = read_dataset(DatasetSpec(uri="datasets/shards"), settings, seed=0)
    assert [ex.completion for ex in raw.train] == [r["completion"] for r in ROWS]
    assert raw.train[3].where == "datasets/shards/train-00001-of-00002.parquet record 1"


def test_max_examples_stops_reading(settings):
    lines = _jsonl(ROWS).decode().splitlines()
    lines.insert(5, "{broken")  # line 6, after the 5 records that are read
    (settings.volume_root / "datasets" / "long.jsonl").write_text("\n".join(lines))
    raw = read_dataset(DatasetSpec(uri="datasets/long.jsonl", max_examples=5), settings, seed=0)
    assert len(raw.train) == 5 and raw.report.records == 5 and raw.report.max_examples == 5
    with pytest.raises(DatasetError, match="line 6 is not valid JSON"):
        read_dataset(DatasetSpec(uri="datasets/long.jsonl"), settings, seed=0)


# --------------------------------------------------------------------------------------------------
# bad files


BAD_FILES = [
    ("empty.jsonl", b"", "is empty (0 bytes)"),
    ("blank.jsonl", b"\n  \n\n", "is empty: it holds no records"),
    ("bad.jsonl.gz", gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": \n'),
     "line 3 is not valid JSON (Expecting value at column 10)"),
    ("bad.json", b'[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]',
     "is not valid JSON: Expecting ',' delimiter at line 4 column 3"),
    ("object.json", b'{"data": [{"text": "a"}]}', "holds a JSON object (['data']), not an array of records"),
    ("bad.csv", b'prompt,completion\n"a","b"\n"c","d","e"\n', "line 3 has 3 fields but the header has 2"),
    ("badcell.csv", b'messages\n"[{""role"": ""user""}"\n', "line 2: column 'messages' is not valid JSON"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2 is not UTF-8 text"),
    ("fake.parquet", b'{"text": "a"}\n', "is named .parquet but is not a Parquet file"),
    ("broken.parquet", b"PAR1" + b"\0" * 64, "is not a readable Parquet file"),
    ("truncated.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:40], "is a damaged gzip file"),
    ("numbers.txt", b"1 2 3\n", "cannot tell the format of datasets/numbers.txt"),
]


@pytest.mark.parametrize("name,body,fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_named_with_the_place(settings, name, body, fragment):
    (settings.volume_root / "datasets" / name).write_bytes(body)
    with pytest.raises(DatasetError) as info:
        read_dataset(DatasetSpec(uri=f"datasets/{name}"), settings, seed=0)
    assert f"datasets/{name}" in str(info.value) and fragment in str(info.value)


def test_a_gzip_bomb_stops_at_the_cap(volume):
    from config.settings import WorkerSettings

    settings = WorkerSettings(max_dataset_bytes=100_000)
    (volume / "datasets" / "bomb.jsonl.gz").write_bytes(gzip.compress(b" " * 50_000_000))
    with pytest.raises(DatasetError, match="decompresses to more than the 100000-byte cap"):
        read_dataset(DatasetSpec(uri="datasets/bomb.jsonl.gz"), settings, seed=0)


def test_a_file_over_the_cap_is_refused_before_reading(volume):
    from config.settings import WorkerSettings

    (volume / "datasets" / "big.jsonl").write_bytes(_jsonl(ROWS * 20))
    settings = WorkerSettings(max_dataset_bytes=1000)
    with pytest.raises(DatasetError, match=r"dataset datasets/big.jsonl is \d+ bytes, over the 1000-byte cap"):
        read_dataset(DatasetSpec(uri="datasets/big.jsonl"), settings, seed=0)


def test_many_bad_records_are_listed_together(settings):
    rows = [{"messages": [{"role": "bot" if i % 2 else "user", "content": "x"},
                          {"role": "assistant", "content": "y"}]} for i in range(14)]
    rows[4] = {"prompt": "p", "completion": ""}
    (settings.volume_root / "datasets" / "mixed.jsonl").write_bytes(_jsonl(rows))
    with pytest.raises(DatasetError) as info:
        read_dataset(DatasetSpec(uri="datasets/mixed.jsonl"), settings, seed=0)
    assert str(info.value) == (
        "8 of 14 records in datasets/mixed.jsonl are not usable — line 2, line 4, line 6, line 8, line 10 "
        "and others: turn 1 has role 'bot'; roles are system, user, assistant; line 5: has an empty completion. "
        "Fix them and send the dataset again"
    )


# --------------------------------------------------------------------------------------------------
# eval sets and the report


def test_eval_uri_is_read_and_reported(settings, tokenizer):
    (settings.volume_root / "datasets" / "eval.csv").write_bytes(_csv(ROWS[:2]))
    raw = read_dataset(DatasetSpec(uri="datasets/capitals.jsonl", eval_uri="datasets/eval.csv"), settings, seed=0)
    prepared = tokenize_dataset(raw, tokenizer, max_seq_length=256, train_on_inputs=False)
    report = prepared.report
    assert (report.examples, report.eval_examples) == (96, 2)
    assert report.eval_source == "datasets/eval.csv"
    assert report.eval_sha256 == hashlib.sha256(_csv(ROWS[:2])).hexdigest()
    assert report.eval_tokens == sum(len(ids) for ids in prepared.eval["input_ids"])


def test_eval_fraction_holds_out_whole_records_without_overlap(settings, tokenizer):
    records = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(20)]
    raw = read_dataset(DatasetSpec(records=records, eval_fraction=0.25), settings, seed=7)
    train, held = {ex.prompt for ex in raw.train}, {ex.prompt for ex in raw.eval}
    assert len(train) == 15 and len(held) == 5 and not train & held
    other = read_dataset(DatasetSpec(records=records, eval_fraction=0.25), settings, seed=8)
    assert {ex.prompt for ex in other.eval} != held  # the seed picks the split
    with pytest.raises(DatasetError, match="leaves none to train on"):
        read_dataset(DatasetSpec(records=records[:1], eval_fraction=0.5), settings, seed=0)


def test_report_numbers(settings, tokenizer):
    rows = [{"prompt": "Short?", "completion": "Yes."},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "answer " * 60}]},
            {"prompt": "word " * 100, "completion": "lost"},
            {"text": "Plain text to learn."}]
    (settings.volume_root / "datasets" / "r.jsonl").write_bytes(_jsonl(rows))
    raw = read_dataset(DatasetSpec(uri="datasets/r.jsonl"), settings, seed=0)
    prepared = tokenize_dataset(raw, tokenizer, max_seq_length=48, train_on_inputs=False)
    d = prepared.report.to_dict()
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    assert (d["records"], d["examples"], d["eval_examples"]) == (4, 3, 0)
    assert d["formats"] == {"prompt_completion": 2, "chat": 1, "text": 1}
    assert d["truncated"] == 2 and d["longest"] == 48 and d["max_seq_length"] == 48
    assert d["dropped"] == {"no completion tokens within max_seq_length": 1}
    assert d["dropped_examples"] == [{"where": "line 3", "reason": "no completion tokens within max_seq_length"}]
    assert d["tokens"] == sum(lengths)
    assert d["trained_tokens"] == sum(l != IGNORE_INDEX for ls in prepared.train["labels"] for l in ls)
    assert d["token_stats"] == {"min": min(lengths), "mean": round(sum(lengths) / 3, 1),
                                "p50": sorted(lengths)[1], "p95": max(lengths), "max": max(lengths)}
    assert d["file_format"] == "jsonl" and d["bytes"] == len(_jsonl(rows)) and d["format"] == "auto"
    assert any("2 of 4 examples are longer than max_seq_length 48" in w for w in d["warnings"])
    json.dumps(d)  # it goes into the output, the manifest and the record as is


def test_inline_records_over_the_setting_cap(volume):
    from config.settings import WorkerSettings

    settings = WorkerSettings(max_inline_records=2)
    with pytest.raises(InputError, match="3 inline records is over the 2 cap"):
        read_dataset(DatasetSpec(records=[{"text": "a"}] * 3), settings, seed=0)


def test_subset_and_split_need_an_hf_uri():
    with pytest.raises(ValueError, match="'subset' and 'split' apply to hf:// datasets only"):
        DatasetSpec(uri="datasets/x.jsonl", split="train")


def test_labels_by_bisection_match_the_overlap_rule(tokenizer, settings):
    # Multi-byte characters split into several byte tokens with shared offsets: the fast path must
    # still label exactly the tokens whose characters overlap a trained span.
    from data.tokenize import _labels

    texts = ["Café au lait? Oui.", "東京は日本の首都です。🙂🙂", "  spaces   and\ttabs\n\nnew lines  ", "a", "ééé🙂x"]
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        for spans in ([(0, len(text))], [(1, 3)], [(2, len(text) - 1)], [(0, 1), (len(text) - 2, len(text))]):
            expected = [t if any(s < b and e > a for a, b in spans) else IGNORE_INDEX
                        for t, (s, e) in zip(ids, offsets)]
            assert _labels(ids, offsets, spans) == expected, (text, spans)


def test_prepared_columns_are_int64_lists(tokenizer, settings):
    prepared = prepare([{"prompt": "Q?", "completion": "A."}] * 3, tokenizer, settings)
    assert str(prepared.train.features["input_ids"].feature.dtype) == "int64"
    assert str(prepared.train.features["labels"].feature.dtype) == "int64"
    assert len(prepared.train) == 3 and prepared.train[2]["input_ids"] == prepared.train[0]["input_ids"]


def test_records_that_are_not_objects(settings):
    (settings.volume_root / "datasets" / "list.json").write_text('[{"text": "ok"}, "just a string", [1, 2], null]')
    with pytest.raises(DatasetError) as info:
        read_dataset(DatasetSpec(uri="datasets/list.json"), settings, seed=0)
    message = str(info.value)
    assert message.startswith("3 of 4 records in datasets/list.json are not usable — record 2: is a JSON string, "
                              "not an object;")
    assert "record 3: is a JSON array, not an object" in message and "record 4: is a JSON null" in message


def test_folder_skips_metadata_and_hidden_files(settings):
    folder = settings.volume_root / "datasets" / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text('{"features": {}}')
    (folder / "LICENSE.txt").write_text("MIT")
    (folder / "part.jsonl").write_bytes(_jsonl(ROWS[:2]))
    raw = read_dataset(DatasetSpec(uri="datasets/saved"), settings, seed=0)
    assert len(raw.train) == 2 and raw.report.file_format == "jsonl"
