"""dataset spec → PreparedDataset: records fetched, parsed, normalized, tokenized and masked, plus a report.

Runs with the tokenizer only (no model weights), so ``action: validate`` and the first seconds of a
training job catch bad data before a GPU minute is spent. Every example becomes ``input_ids`` and
``labels``, where labels are ``-100`` on every token the model should not learn to produce (system and
user turns, prompts) unless ``train_on_inputs`` is set.

Sources (dataset_sources.py): inline ``records``, a file or folder on the volume, http(s) URLs,
``s3://bucket/key`` and ``hf://org/name``. Files (dataset_files.py): JSONL, JSON arrays, CSV/TSV,
Parquet, gzip-compressed text formats. Schemas: chat ``messages``, ShareGPT ``conversations``,
prompt/completion, alpaca, plain text — detected per record or named by ``format``.

Bad records are collected, not stopped at: the error lists how many records are unusable and where
the first few are (``line 7``, ``record 12``), grouped by problem, so a user fixes a file in one go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.job import DatasetSpec
from config.settings import WorkerSettings
from errors import DatasetError, InputError

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
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
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
LISTED = 5  # records named per problem in errors and in the report
TOKENIZE_BATCH = 1000


@dataclass
class DatasetReport:
    """What was loaded, what was cut and dropped and why: the ``validate`` output, the manifest's
    ``dataset`` and the record all carry ``to_dict()`` of this."""

    source: str
    format: str
    file_format: str = ""
    bytes: int = 0
    sha256: str = ""
    records: int = 0  # rows read (after max_examples), before any split or drop
    examples: int = 0  # training examples kept
    eval_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    eval_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: list[dict[str, str]] = field(default_factory=list)  # the first few, with where
    formats: dict[str, int] = field(default_factory=dict)
    max_seq_length: int = 0
    longest: int = 0
    token_stats: dict[str, float] = field(default_factory=dict)  # per training example
    max_examples: int | None = None
    eval_source: str | None = None
    eval_sha256: str | None = None
    eval_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.dropped_examples) < LISTED:
            self.dropped_examples.append({"where": where, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in self.__dict__.items()}


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
    where: str = ""  # "line 7", "record 3": for reports


# --------------------------------------------------------------------------------------------------
# reading


@dataclass
class _Part:
    examples: list[Example]
    sha256: str
    source: str
    file_format: str
    bytes: int
    records: int


def _read_part(uri: str | None, records: list[dict] | None, spec: DatasetSpec, settings: WorkerSettings,
               *, limit: int | None, what: str) -> _Part:
    """Fetch one source (the dataset or its eval set), parse it and normalize every record."""
    if records is not None:
        if len(records) > settings.max_inline_records:
            raise InputError(f"{what}: {len(records)} inline records is over the {settings.max_inline_records} "
                             "cap (MAX_INLINE_RECORDS); upload a file and send its uri instead")
        raw = json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        rows = records[:limit] if limit is not None else records
        wheres = [f"record {i + 1}" for i in range(len(rows))]
        examples = _normalize_all(rows, wheres.__getitem__, spec.format, "the inline records")
        return _Part(examples, hashlib.sha256(raw).hexdigest(), f"inline ({len(records)} records)", "inline",
                     len(raw), len(rows))

    from dataset_files import read_files
    from dataset_sources import fetch

    # An hf:// eval set is the same subset's validation (else test) split, never the training split.
    for_eval = what == "dataset.eval_uri"
    with fetch(uri or "", settings, subset=spec.subset, split=None if for_eval else spec.split, what=what,
               for_eval=for_eval) as fetched:
        parsed = read_files(fetched.paths, fetched.names, cap=settings.max_dataset_bytes, limit=limit)
    examples = _normalize_all(parsed.rows, parsed.where, spec.format, fetched.source)
    formats = sorted(set(parsed.file_formats))
    return _Part(examples, fetched.sha256, fetched.source, "+".join(formats), fetched.bytes, len(parsed.rows))


def _normalize_all(rows: list[Any], where, fmt: str, source: str) -> list[Example]:
    """Normalize every row; collect the problems and raise one error that lists them by place."""
    examples: list[Example] = []
    problems: dict[str, list[str]] = {}
    bad = 0
    for index, row in enumerate(rows):
        place = where(index)
        try:
            examples.append(normalize(row, place, fmt))
        except DatasetError as exc:
            bad += 1
            places = problems.setdefault(exc.message, [])
            if len(places) < LISTED:
                places.append(place)
    if bad:
        groups = sorted(problems.items(), key=lambda item: -len(item[1]))
        described = [f"{', '.join(places)}{' and others' if len(places) == LISTED else ''}: {message}"
                     for message, places in groups[:3]]
        more = f" (and {len(groups) - 3} other kinds of problem)" if len(groups) > 3 else ""
        raise DatasetError(
            f"{bad} of {len(rows)} records in {source} are not usable — " + "; ".join(described) + more
            + ". Fix them and send the dataset again"
        )
    return examples


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


def _problem(message: str) -> DatasetError:
    # The message alone, so records with the same problem group; _normalize_all adds where they are.
    return DatasetError(message)


def _content(value: Any) -> str | None:
    """A turn's text: a string, or OpenAI's list of parts with type 'text'."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def normalize(record: Any, where: str | int, fmt: str) -> Example:
    """One raw record → Example, or DatasetError saying what is wrong with it."""
    if isinstance(where, int):
        where = f"record {where + 1}"
    if not isinstance(record, dict):
        kind_of = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
        raise _problem(f"is a JSON {kind_of.get(type(record), 'null')}, not an object; each record must be an "
                       "object such as {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")
    kind = detect_format(record) if fmt == "auto" else fmt
    found = sorted(record)
    if kind is None:
        raise _problem(f"no known format; found columns {found}, expected one of: "
                       + "; ".join(f"{k} ({v})" for k, v in FORMAT_KEYS.items()))
    key = FORMAT_KEYS[kind]
    if any(k not in record for k in REQUIRED_COLUMNS[kind]):
        raise _problem(f"format '{kind}' needs {key}; found columns {found}")

    if kind in ("chat", "sharegpt"):
        column = "messages" if kind == "chat" else "conversations"
        turns = record[column]
        if not isinstance(turns, list) or not turns:
            raise _problem(f"'{column}' must be a non-empty list of turns")
        messages = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _problem(f"turn {t + 1} must be an object")
            if kind == "chat":
                role, content = turn.get("role"), _content(turn.get("content"))
                role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
                if role not in ROLES:
                    raise _problem(f"turn {t + 1} has role {turn.get('role')!r}; roles are {', '.join(ROLES)}")
            else:
                who, content = turn.get("from"), _content(turn.get("value"))
                role = SHAREGPT_ROLES.get(str(who).lower())
                if role is None:
                    raise _problem(f"turn {t + 1} has from={who!r}; use one of "
                                   f"{', '.join(sorted(SHAREGPT_ROLES))}")
            if content is None:
                raise _problem(f"turn {t + 1} ({role}) content must be a string")
            weight = turn.get("weight")
            weight = 1 if weight is None else weight  # Parquet fills an absent weight with null
            if weight not in (0, 1) or isinstance(weight, bool):
                raise _problem(f"turn {t + 1} weight must be 0 or 1; got {weight!r}")
            messages.append((role, content, role == "assistant" and weight == 1))
        if not any(role == "assistant" and content.strip() for role, content, _ in messages):
            raise _problem("has no non-empty assistant turn to learn from")
        return Example(kind, messages=tuple(messages), where=where)

    if kind == "text":
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise _problem("'text' must be a non-empty string")
        return Example(kind, text=text, where=where)

    if kind == "alpaca":
        instruction, extra, completion = record["instruction"], record.get("input"), record["output"]
        if not isinstance(instruction, str) or not instruction.strip():
            raise _problem("'instruction' must be a non-empty string")
        if extra is not None and not isinstance(extra, str):
            raise _problem("'input' must be a string (or absent)")
        prompt = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        if not isinstance(completion, str):
            raise _problem("'output' must be a string")
    else:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _problem("prompt and completion must be strings")
    if not completion.strip():
        raise _problem(f"has an empty {'output' if kind == 'alpaca' else 'completion'}")
    return Example(kind, prompt=prompt, completion=completion, where=where)


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
    if consistent or not spans:
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
        text, spans = _chat_text(tokenizer, template or DEFAULT_CHAT_TEMPLATE, ex.messages, train_on_inputs)
        # A model's own template ends each turn with its end-of-turn token. The default template's
        # <|im_end|> is only text to a tokenizer that lacks it: append EOS so the model learns to stop.
        add_eos = template is None and tokenizer.eos_token not in ("<|im_end|>", None)
        return text, spans, add_eos
    if template:
        turns = (("user", ex.prompt, False), ("assistant", ex.completion, True))
        return (*_chat_text(tokenizer, template, turns, train_on_inputs), False)
    text = ex.prompt + ex.completion
    start = 0 if train_on_inputs else len(ex.prompt)
    return text, [(start, len(text))], True


class TokenColumns:
    """input_ids and labels of many examples, packed flat (8 bytes a token, not a Python int each)."""

    def __init__(self) -> None:
        self.ids, self.labels, self.offsets = array("q"), array("q"), array("i", [0])

    def add(self, ids: list[int], labels: list[int]) -> None:
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.offsets.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to_dataset(self):
        """A datasets.Dataset with list<int64> columns input_ids and labels, built without copies."""
        import numpy as np
        import pyarrow as pa
        from datasets import Dataset
        from datasets.table import InMemoryTable

        offsets = pa.array(np.frombuffer(self.offsets, dtype=np.int32))
        table = pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.frombuffer(self.ids, dtype=np.int64))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(np.frombuffer(self.labels, dtype=np.int64))),
        })
        # A fingerprint of our own: datasets would otherwise pickle the whole table to hash it, a
        # transient copy as large as the data.
        return Dataset(InMemoryTable(table), fingerprint=uuid.uuid4().hex)


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's label: itself where its characters overlap a trained span, else IGNORE_INDEX.

    Offsets of a fast tokenizer never go backwards, so the tokens overlapping a span [a, b) are one
    run: from the first token ending after a to the last starting before b (two bisections).
    """
    labels = [IGNORE_INDEX] * len(ids)
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    for span_start, span_end in spans:
        first, last = bisect_right(ends, span_start), bisect_left(starts, span_end)
        labels[first:last] = ids[first:last]
    return labels


def tokenize_examples(examples: list[Example], tokenizer, *, max_seq_length: int,
                      train_on_inputs: bool, report: DatasetReport,
                      lengths: list[int] | None = None) -> TokenColumns:
    """input_ids and labels per example; truncation and drops are counted in ``report``."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not template else []
    eos = tokenizer.eos_token_id
    out = TokenColumns()
    for first in range(0, len(examples), TOKENIZE_BATCH):  # bounded memory for rendered text
        batch = examples[first: first + TOKENIZE_BATCH]
        rendered = [_example_text(ex, tokenizer, template, train_on_inputs) for ex in batch]
        encoded = tokenizer([text for text, _, _ in rendered], add_special_tokens=False,
                            return_offsets_mapping=True)
        for ex, (_text, spans, add_eos), ids, offsets in zip(batch, rendered, encoded["input_ids"],
                                                             encoded["offset_mapping"]):
            if not spans:
                report.drop("every assistant turn has weight 0", ex.where)
                continue
            labels = _labels(ids, offsets, spans)
            ids, labels = bos + list(ids), [IGNORE_INDEX] * len(bos) + labels
            if add_eos and eos is not None:
                ids, labels = ids + [eos], labels + [eos]
            if len(ids) > max_seq_length:
                report.truncated += 1
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            trained = len(labels) - labels.count(IGNORE_INDEX)
            if trained == 0:
                report.drop("no completion tokens within max_seq_length", ex.where)
                continue
            out.add(ids, labels)
            report.tokens += len(ids)
            report.trained_tokens += trained
            report.longest = max(report.longest, len(ids))
            if lengths is not None:
                lengths.append(len(ids))
    return out


def _token_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": pct(0.5),
            "p95": pct(0.95), "max": ordered[-1]}


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
    report: DatasetReport | None = None  # what reading found; tokenize_dataset completes it


def read_dataset(spec: DatasetSpec, settings: WorkerSettings, *, seed: int) -> RawDataset:
    """Fetch, parse and normalize the records, and split off the eval set. No tokenizer needed."""
    started = time.monotonic()
    part = _read_part(spec.uri, spec.records, spec, settings, limit=spec.max_examples, what="dataset.uri")
    report = DatasetReport(source=part.source, format=spec.format, file_format=part.file_format,
                           bytes=part.bytes, sha256=part.sha256, records=part.records,
                           max_examples=spec.max_examples, eval_fraction=spec.eval_fraction)
    examples = part.examples
    report.formats = dict(Counter(ex.kind for ex in examples))
    eval_examples: list[Example] = []
    if spec.eval_uri is not None:
        held = _read_part(spec.eval_uri, None, spec, settings, limit=None, what="dataset.eval_uri")
        eval_examples = held.examples
        report.eval_source, report.eval_sha256 = held.source, held.sha256
    elif spec.eval_fraction > 0:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(examples) * spec.eval_fraction))
        if n_eval >= len(examples):
            raise DatasetError(
                f"eval_fraction {spec.eval_fraction} of {len(examples)} examples leaves none to train on; "
                "lower eval_fraction or add examples"
            )
        held_out = set(order[:n_eval])
        eval_examples = [ex for i, ex in enumerate(examples) if i in held_out]
        examples = [ex for i, ex in enumerate(examples) if i not in held_out]
    report.seconds = round(time.monotonic() - started, 3)
    logger.info("read %s: %d records (%s, %s) in %.1fs", part.source, part.records, part.file_format,
                report.formats, report.seconds)
    return RawDataset(examples, eval_examples, part.sha256, part.source, spec.format, report)


def tokenize_dataset(raw: RawDataset, tokenizer, *, max_seq_length: int, train_on_inputs: bool
                     ) -> PreparedDataset:
    """Tokenize and mask with the base model's tokenizer; report what was kept, cut and dropped."""
    started = time.monotonic()
    report = raw.report or DatasetReport(source=raw.source, format=raw.format, sha256=raw.sha256,
                                         formats=dict(Counter(ex.kind for ex in raw.train + raw.eval)))
    report.max_seq_length = max_seq_length
    lengths: list[int] = []
    train = tokenize_examples(raw.train, tokenizer, max_seq_length=max_seq_length,
                              train_on_inputs=train_on_inputs, report=report, lengths=lengths)
    report.examples = len(train)
    report.token_stats = _token_stats(lengths)
    del lengths
    if not report.examples:
        raise DatasetError(
            f"no usable training examples in {raw.source}: "
            + ", ".join(f"{n} dropped: {why}" for why, n in report.dropped.items())
            + (f" (first: {report.dropped_examples[0]['where']})" if report.dropped_examples else "")
            + "; raise max_seq_length or shorten the prompts"
        )
    eval_ds = None
    if raw.eval:
        eval_report = DatasetReport(source=raw.source, format=raw.format)
        evaluated = tokenize_examples(raw.eval, tokenizer, max_seq_length=max_seq_length,
                                      train_on_inputs=train_on_inputs, report=eval_report)
        report.eval_examples = len(evaluated)
        report.eval_tokens = eval_report.tokens
        eval_ds = evaluated.to_dataset() if report.eval_examples else None
        if not report.eval_examples:
            report.warnings.append("every eval example was dropped; training runs without evaluation")
    if report.truncated:
        report.warnings.append(
            f"{report.truncated} of {report.examples + sum(report.dropped.values())} examples are longer than "
            f"max_seq_length {max_seq_length} and were cut; raise max_seq_length to keep them whole"
        )
    if report.dropped:
        report.warnings.append(
            f"{sum(report.dropped.values())} examples were dropped: "
            + ", ".join(f"{n} {why}" for why, n in report.dropped.items())
        )
    report.seconds = round(report.seconds + time.monotonic() - started, 3)
    logger.info(
        "dataset %s: %d train / %d eval examples, %d tokens (%d trained), %d truncated, %d dropped, "
        "formats %s, sha256 %s… in %.1fs",
        report.source, report.examples, report.eval_examples, report.tokens, report.trained_tokens,
        report.truncated, sum(report.dropped.values()), report.formats, report.sha256[:12], report.seconds,
    )
    return PreparedDataset(train=train.to_dataset(), eval=eval_ds, report=report)
