"""dataset spec → PreparedDataset: records fetched, parsed, normalized, tokenized and masked, plus a report.

Runs with the tokenizer only (no model weights), so ``action: validate`` and the first seconds of a
training job catch bad data before a GPU minute is spent. Every example becomes ``input_ids`` and
``labels``, where labels are ``-100`` on every token the model should not learn to produce (system and
user turns, prompts) unless ``train_on_inputs`` is set.

Sources (data/sources.py): inline ``records``, a file or folder on the volume, http(s) URLs,
``s3://bucket/key`` and ``hf://org/name``. Files (data/formats.py): JSONL, JSON arrays, CSV/TSV,
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.job import DatasetSpec
from config.settings import WorkerSettings
from data.budget import ReadBudget
from data.normalize import Example, normalize_all
from data.report import DatasetReport
from data.tokenize import token_stats, tokenize_examples
from errors import DatasetError, InputError, ModelError

logger = logging.getLogger(__name__)


@dataclass
class PreparedDataset:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    report: DatasetReport


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
        try:
            raw = json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        except RecursionError:
            raise InputError("dataset.records: an inline record is nested too deeply (over about 1,000 levels of "
                             "[ or {); flatten the records") from None
        rows = records[:limit] if limit is not None else records
        wheres = [f"record {i + 1}" for i in range(len(rows))]
        examples = normalize_all(rows, wheres.__getitem__, spec.format, "the inline records")
        return _Part(examples, hashlib.sha256(raw).hexdigest(), f"inline ({len(records)} records)", "inline",
                     len(raw), len(rows))

    from data.formats import read_files
    from data.sources import fetch

    # An hf:// eval set is the same subset's validation (else test) split, never the training split.
    for_eval = what == "dataset.eval_uri"
    with fetch(uri or "", settings, subset=spec.subset, split=None if for_eval else spec.split, what=what,
               for_eval=for_eval) as fetched:
        budget = ReadBudget(settings.max_dataset_bytes, settings.max_dataset_records, settings.dataset_read_timeout_s)
        parsed = read_files(fetched.paths, fetched.names, budget=budget, limit=limit)
    examples = normalize_all(parsed.rows, parsed.where, spec.format, fetched.source)
    formats = sorted(set(parsed.file_formats))
    return _Part(examples, fetched.sha256, fetched.source, "+".join(formats), fetched.bytes, len(parsed.rows))


# --------------------------------------------------------------------------------------------------
# the stage


def load_tokenizer(model_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # whatever transformers or tokenizers raise: the model's files are at fault
        raise _tokenizer_error(Path(model_path), exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")


def _tokenizer_error(model_path: Path, exc: Exception) -> ModelError:
    """A ``model:`` error naming the broken tokenizer file (the first JSON one that does not parse)."""
    for name in TOKENIZER_FILES:
        file = model_path / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_bytes())
        except (ValueError, OSError) as bad:
            why = f"{bad.msg} at line {bad.lineno}" if isinstance(bad, json.JSONDecodeError) else type(bad).__name__
            return ModelError(f"the tokenizer file {file} is damaged ({why}); download the model again or "
                              "replace that file")
    detail = " ".join(str(exc).split())[:200]
    return ModelError(f"the tokenizer of {model_path} cannot be loaded ({type(exc).__name__}"
                      + (f": {detail}" if detail else "") + "); check its tokenizer files or download the model again")


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


# What to do about each reason an example is dropped: the hint names the cause that applies.
DROP_HINTS = {
    "every assistant turn has weight 0": "nothing is left to learn from those: give at least one assistant "
    "turn per conversation weight 1 (or leave weight out)",
    "no completion tokens within max_seq_length": "raise max_seq_length or shorten the prompts",
}


UNWEIGHTED = "every assistant turn has weight 0"


def require_something_to_learn(raw: RawDataset, *, train_on_inputs: bool) -> None:
    """Fail now, before any weight is read, when tokenizing would drop every example for having no
    weighted assistant turn: that is known from the records alone (the error tokenize_dataset gives)."""
    if train_on_inputs or not raw.train:
        return
    if any(not ex.messages or any(role == "assistant" and trained for role, _, trained in ex.messages)
           for ex in raw.train):
        return
    raise DatasetError(f"no usable training examples in {raw.source}: {len(raw.train)} dropped: {UNWEIGHTED} "
                       f"(first: {raw.train[0].where}); {DROP_HINTS[UNWEIGHTED]}")


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
    report.token_stats = token_stats(lengths)
    del lengths
    if not report.examples:
        raise DatasetError(
            f"no usable training examples in {raw.source}: "
            + ", ".join(f"{n} dropped: {why}" for why, n in report.dropped.items())
            + (f" (first: {report.dropped_examples[0]['where']})" if report.dropped_examples else "")
            + "; " + "; ".join(DROP_HINTS.get(why, "check those records") for why in report.dropped)
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
