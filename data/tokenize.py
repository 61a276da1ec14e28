"""Examples into token ids and labels (prompt tokens masked), packed flat into Arrow columns."""

from __future__ import annotations

import uuid
from array import array
from bisect import bisect_left, bisect_right

from data.normalize import Example
from data.report import DatasetReport
from errors import DatasetError

IGNORE_INDEX = -100


# The documented default for tokenizers without a chat template: ChatML, as Qwen models use.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


TOKENIZE_BATCH = 1000


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


def _text_limit(tokenizer, max_seq_length: int) -> int:
    """Characters of rendered text that surely hold more than ``max_seq_length`` tokens: no token is
    longer than the vocabulary's longest entry. Only that much is tokenized; the rest would be cut."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return (max_seq_length + 1) * max(longest, 1)


def _cut(rendered: tuple[str, list[tuple[int, int]], bool], limit: int
         ) -> tuple[str, list[tuple[int, int]], bool]:
    """The text cut at ``limit`` characters before tokenizing: a 1 MiB record costs what its first
    max_seq_length tokens cost, not minutes of BPE. A trained span past the cut stays, empty, so the
    example is dropped for having no completion within max_seq_length (the true reason)."""
    text, spans, add_eos = rendered
    if len(text) <= limit:
        return rendered
    return text[:limit], [(min(a, limit), min(b, limit)) for a, b in spans], add_eos


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
    limit = _text_limit(tokenizer, max_seq_length)
    for first in range(0, len(examples), TOKENIZE_BATCH):  # bounded memory for rendered text
        batch = examples[first: first + TOKENIZE_BATCH]
        rendered = [_cut(_example_text(ex, tokenizer, template, train_on_inputs), limit) for ex in batch]
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


def token_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": pct(0.5),
            "p95": pct(0.95), "max": ordered[-1]}
