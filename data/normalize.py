"""Records of every supported format (alpaca, chat, sharegpt, prompt_completion, text) into one Example shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data.report import LISTED
from errors import DatasetError

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


@dataclass(frozen=True)
class Example:
    """One record, normalized: a list of chat turns, or a prompt/completion pair, or plain text."""

    kind: str  # the detected format
    messages: tuple[tuple[str, str, bool], ...] = ()  # (role, content, trained)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    where: str = ""  # "line 7", "record 3": for reports


def normalize_all(rows: list[Any], where, fmt: str, source: str) -> list[Example]:
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
    # The message alone, so records with the same problem group; normalize_all adds where they are.
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
