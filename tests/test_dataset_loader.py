"""dataset_loader (first cut): records → input_ids + labels with the right tokens masked."""

from __future__ import annotations

import json

import pytest

from config.job import DatasetSpec
from dataset_loader import IGNORE_INDEX, load_tokenizer, read_dataset, tokenize_dataset
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
