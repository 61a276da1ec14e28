"""The dataset report: what was read, kept, truncated and dropped, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LISTED = 5  # records named per problem in errors and in the report


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
