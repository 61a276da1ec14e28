"""dataset spec → PreparedDataset: records read, normalized, tokenized and masked, plus a report.

Runs with the tokenizer only (no model weights), so ``action: validate`` and the first seconds of a
training job catch bad data before a GPU minute is spent. Every example becomes ``input_ids`` and
``labels``, where labels are ``-100`` on every token the model should not learn to produce (system and
user turns, prompts) unless ``train_on_inputs`` is set.

First cut: inline records and JSONL files on the volume; prompt/completion, chat ``messages``,
alpaca, ShareGPT and plain text records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.job import DatasetSpec
from config.settings import WorkerSettings
from errors import DatasetError, InputError
from model_resolver import check_inside

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The documented default for tokenizers without a chat template: ChatML, as Qwen models use.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
REQUIRED_COLUMNS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
FORMAT_KEYS = {
    "chat": "messages",
    "sharegpt": "conversations",
    "prompt_completion": "prompt + completion",
    "alpaca": "instruction + output (input optional)",
    "text": "text",
}


@dataclass
class DatasetReport:
    source: str
    format: str
    examples: int = 0
    eval_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    sha256: str = ""
    max_seq_length: int = 0
    longest: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class PreparedDataset:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    report: DatasetReport


@dataclass(frozen=True)
class Example:
    """One record, normalized: a list of chat turns, or a prompt/completion pair, or plain text."""

    kind: str  # the detected format
    messages: tuple[tuple[str, str, bool], ...] = ()  # (role, content, trained)
    prompt: str = ""
    completion: str = ""
    text: str = ""


# --------------------------------------------------------------------------------------------------
# reading


def _read_records(uri: str | None, records: list[dict] | None, settings: WorkerSettings) -> tuple[list[Any], str, str]:
    """(records, sha256 of the raw data, a printable source name)."""
    if records is not None:
        raw = json.dumps(records, sort_keys=True, separators=(",", ":")).encode()
        return list(records), hashlib.sha256(raw).hexdigest(), f"inline ({len(records)} records)"
    uri = uri or ""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme:
        raise InputError(
            f"dataset.uri scheme '{scheme}://' is not supported by this worker yet; "
            "use a path on the volume or inline 'records'"
        )
    path = Path(uri) if uri.startswith("/") else settings.volume_root / uri
    try:
        path = check_inside(str(path), (settings.volume_root,), "dataset path")
    except InputError as exc:
        raise InputError(f"dataset.uri: {exc}") from None
    if not path.is_file():
        raise DatasetError(f"dataset file {uri} does not exist on the volume ({path})")
    size = path.stat().st_size
    if size > settings.max_dataset_bytes:
        raise DatasetError(
            f"dataset file {uri} is {size} bytes, over the {settings.max_dataset_bytes}-byte cap "
            "(MAX_DATASET_BYTES); split it or raise the cap"
        )
    raw = path.read_bytes()
    return _parse_jsonl(raw, uri), hashlib.sha256(raw).hexdigest(), uri


def _parse_jsonl(raw: bytes, name: str) -> list[Any]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSONL") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{name} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from None
    if not rows:
        raise DatasetError(f"{name} is empty: it has no JSON lines")
    return rows


# --------------------------------------------------------------------------------------------------
# normalizing


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _problem(index: int, message: str) -> DatasetError:
    return DatasetError(f"record {index + 1}: {message}")


def normalize(record: Any, index: int, fmt: str) -> Example:
    """One raw record → Example, or DatasetError naming the record and what is wrong."""
    kind = detect_format(record) if fmt == "auto" else fmt
    if kind is None:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise _problem(
            index,
            f"no known format; found columns {found}, expected one of: "
            + "; ".join(f"{k} ({v})" for k, v in FORMAT_KEYS.items()),
        )
    key = FORMAT_KEYS[kind]
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED_COLUMNS[kind]):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise _problem(index, f"format '{kind}' needs {key}; found columns {found}")

    if kind in ("chat", "sharegpt"):
        turns = record["messages" if kind == "chat" else "conversations"]
        if not isinstance(turns, list) or not turns:
            raise _problem(index, f"'{'messages' if kind == 'chat' else 'conversations'}' must be a non-empty list")
        messages = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _problem(index, f"turn {t + 1} must be an object")
            if kind == "chat":
                role, content = turn.get("role"), turn.get("content")
                if role not in ROLES:
                    raise _problem(index, f"turn {t + 1} has role {role!r}; roles are {', '.join(ROLES)}")
            else:
                who, content = turn.get("from"), turn.get("value")
                role = SHAREGPT_ROLES.get(str(who).lower())
                if role is None:
                    raise _problem(
                        index, f"turn {t + 1} has from={who!r}; use one of {', '.join(sorted(SHAREGPT_ROLES))}"
                    )
            if not isinstance(content, str):
                raise _problem(index, f"turn {t + 1} content must be a string")
            weight = turn.get("weight", 1)
            if weight not in (0, 1):
                raise _problem(index, f"turn {t + 1} weight must be 0 or 1; got {weight!r}")
            messages.append((role, content, role == "assistant" and weight == 1))
        if not any(role == "assistant" and content.strip() for role, content, _ in messages):
            raise _problem(index, "has no non-empty assistant turn to learn from")
        return Example(kind, messages=tuple(messages))

    if kind == "text":
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise _problem(index, "'text' must be a non-empty string")
        return Example(kind, text=text)

    if kind == "alpaca":
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        completion = record["output"]
    else:
        prompt, completion = record["prompt"], record["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise _problem(index, "prompt and completion must be strings")
    if not completion.strip():
        raise _problem(index, "has an empty completion")
    return Example(kind, prompt=prompt, completion=completion)


# --------------------------------------------------------------------------------------------------
# tokenizing


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _chat_text(tokenizer, template: str, turns: tuple[tuple[str, str, bool], ...],
               train_on_inputs: bool) -> tuple[str, list[tuple[int, int]]]:
    """Render turns with the chat template; return the text and the char spans to train on."""
    messages = [{"role": r, "content": c} for r, c, _ in turns]
    full = _render(tokenizer, template, messages, False)
    if train_on_inputs:
        return full, [(0, len(full))]
    spans = []
    consistent = True
    for i, (role, _, trained) in enumerate(turns):
        if role != "assistant" or not trained:
            continue
        before = _render(tokenizer, template, messages[:i], True) if i else ""
        upto = _render(tokenizer, template, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            consistent = False
            break
        spans.append((len(before), len(upto)))
    if consistent:
        return full, spans
    # Templates that rewrite earlier turns (e.g. strip reasoning) are not prefix-stable: learn the
    # last assistant turn only, which is what such templates are trained on anyway.
    last = max(i for i, (role, _, trained) in enumerate(turns) if role == "assistant" and trained)
    full = _render(tokenizer, template, messages[: last + 1], False)
    before = _render(tokenizer, template, messages[:last], True)
    if not full.startswith(before):
        raise DatasetError("the model's chat template renders a conversation inconsistently; use format "
                           "'prompt_completion' or 'text' for this model")
    return full, [(len(before), len(full))]


def _example_text(ex: Example, tokenizer, template: str | None, train_on_inputs: bool
                  ) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, trained char spans, append EOS) for one example."""
    if ex.kind == "text":
        return ex.text, [(0, len(ex.text))], True
    if ex.messages:
        return (*_chat_text(tokenizer, template or DEFAULT_CHAT_TEMPLATE, ex.messages, train_on_inputs), False)
    if template:
        turns = (("user", ex.prompt, False), ("assistant", ex.completion, True))
        return (*_chat_text(tokenizer, template, turns, train_on_inputs), False)
    text = ex.prompt + ex.completion
    start = 0 if train_on_inputs else len(ex.prompt)
    return text, [(start, len(text))], True


def tokenize_examples(examples: list[Example], tokenizer, *, max_seq_length: int,
                      train_on_inputs: bool, report: DatasetReport) -> dict[str, list[list[int]]]:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    rendered = [_example_text(ex, tokenizer, template, train_on_inputs) for ex in examples]
    encoded = tokenizer(
        [text for text, _, _ in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
    )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not template else []
    eos = tokenizer.eos_token_id
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for (text, spans, add_eos), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        labels = [
            tok if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE_INDEX
            for tok, (s, e) in zip(ids, offsets)
        ]
        ids, labels = bos + list(ids), [IGNORE_INDEX] * len(bos) + labels
        if add_eos and eos is not None:
            ids, labels = ids + [eos], labels + [eos]
        if len(ids) > max_seq_length:
            report.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        if trained == 0:
            reason = "no completion tokens within max_seq_length"
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        report.tokens += len(ids)
        report.trained_tokens += trained
        report.longest = max(report.longest, len(ids))
    return out


# --------------------------------------------------------------------------------------------------
# the stage


def load_tokenizer(model_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class RawDataset:
    """Records read and normalized, not yet tokenized: every format error is found at this point."""

    train: list[Example]
    eval: list[Example]
    sha256: str
    source: str
    format: str


def read_dataset(spec: DatasetSpec, settings: WorkerSettings, *, seed: int) -> RawDataset:
    """Fetch, parse and normalize the records, and split off the eval set. No tokenizer needed."""
    raw, sha, source = _read_records(spec.uri, spec.records, settings)
    if spec.max_examples is not None:
        raw = raw[: spec.max_examples]
    examples = [normalize(record, i, spec.format) for i, record in enumerate(raw)]
    eval_examples: list[Example] = []
    if spec.eval_uri is not None:
        eval_raw, _, _ = _read_records(spec.eval_uri, None, settings)
        eval_examples = [normalize(record, i, spec.format) for i, record in enumerate(eval_raw)]
    elif spec.eval_fraction > 0:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(examples) * spec.eval_fraction))
        if n_eval >= len(examples):
            raise DatasetError(
                f"eval_fraction {spec.eval_fraction} of {len(examples)} examples leaves none to train on"
            )
        held = set(order[:n_eval])
        eval_examples = [ex for i, ex in enumerate(examples) if i in held]
        examples = [ex for i, ex in enumerate(examples) if i not in held]
    return RawDataset(examples, eval_examples, sha, source, spec.format)


def tokenize_dataset(raw: RawDataset, tokenizer, *, max_seq_length: int, train_on_inputs: bool
                     ) -> PreparedDataset:
    """Tokenize and mask with the base model's tokenizer; report what was kept, cut and dropped."""
    from datasets import Dataset

    report = DatasetReport(source=raw.source, format=raw.format, sha256=raw.sha256,
                           max_seq_length=max_seq_length)
    report.formats = dict(Counter(ex.kind for ex in raw.train))
    train = tokenize_examples(raw.train, tokenizer, max_seq_length=max_seq_length,
                              train_on_inputs=train_on_inputs, report=report)
    report.examples = len(train["input_ids"])
    if not report.examples:
        raise DatasetError(
            f"no usable training examples in {raw.source}: "
            + ", ".join(f"{n} dropped: {why}" for why, n in report.dropped.items())
        )
    eval_ds = None
    if raw.eval:
        eval_report = DatasetReport(source=raw.source, format=raw.format)
        evaluated = tokenize_examples(raw.eval, tokenizer, max_seq_length=max_seq_length,
                                      train_on_inputs=train_on_inputs, report=eval_report)
        report.eval_examples = len(evaluated["input_ids"])
        eval_ds = Dataset.from_dict(evaluated) if report.eval_examples else None
    logger.info(
        "dataset %s: %d train / %d eval examples, %d tokens (%d trained), %d truncated, formats %s",
        raw.source, report.examples, report.eval_examples, report.tokens, report.trained_tokens,
        report.truncated, report.formats,
    )
    return PreparedDataset(train=Dataset.from_dict(train), eval=eval_ds, report=report)
