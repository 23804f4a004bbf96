"""Readers that turn the staged public datasets into open-instruct ``messages`` rows.

Each source format has one converter from a raw record to a list of
``{"role", "content"}`` messages. A record that cannot be converted raises
:class:`DataError` naming the file and the 1-based row, unless the caller asks
to skip malformed rows (they are then counted, never silently replaced).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A source file or row that cannot be used; the message names file and row."""


@dataclass(frozen=True)
class RawExample:
    messages: list[dict[str, str]]
    origin: str  # "<file>:<row>" for tracing a pool row back to its source
    id: str | None = None  # the row's own id (messages format), as text; None when it has none
    dataset: str | None = None  # the row's own dataset field (messages format)
    integer_id: bool = False  # the id was a JSON integer (exports write it back as one)
    path: str = ""  # the file it was read from, and its 1-based row (for error messages)
    row: int = 0


@dataclass
class ReadStats:
    rows: int = 0
    malformed: int = 0
    empty_files: int = 0
    malformed_examples: list[str] = field(default_factory=list)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, path: Path, row: int) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(f"{path}: row {row}: not valid UTF-8 ({err.reason} at byte {err.start})")


def read_json(path: str | Path) -> Any:
    """A whole JSON document (.json or .json.gz); an unreadable one raises naming the file."""
    path = Path(path)
    try:
        with _open_binary(path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON document ({err})") from err


def iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(row, record)`` with 1-based rows, for .json (a list), .jsonl and .tsv files, gzipped or not.

    A JSONL or TSV line that cannot be decoded or parsed is yielded as a
    :class:`DataError` value so the caller can decide whether to raise or skip it.
    """
    path = Path(path)
    kind = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
    if kind not in ("json", "jsonl", "tsv"):
        raise DataError(f"{path}: unsupported file type {kind!r} (expected .json, .jsonl or .tsv)")
    row = 0
    try:
        with _open_binary(path) as handle:
            if kind == "json":
                try:
                    data = json.loads(handle.read().decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise DataError(f"{path}: not valid JSON ({err})") from err
                if not isinstance(data, list):
                    raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
                yield from enumerate(data, start=1)
                return
            # Iterate physical lines (never str.splitlines(), which also splits on
            # \x0b, \u2028 ... inside JSON strings).
            for row, raw in enumerate(handle, start=1):
                line = _decode(raw, path, row)
                if isinstance(line, DataError):
                    yield row, line
                    continue
                if not line.strip():
                    continue
                if kind == "jsonl":
                    try:
                        yield row, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield row, DataError(f"{path}: row {row}: not valid JSON ({err.msg})")
                else:
                    yield row, line.rstrip("\r\n").split("\t")
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found (is datasets_dir set right?)") from err
    except (EOFError, OSError, zlib.error) as err:
        # A cut-off download or a corrupt archive: never skippable, whatever on_malformed says.
        where = f"after row {row}" if row else "before the first row"
        raise DataError(f"{path}: corrupt or truncated file, stopped {where} ({type(err).__name__}: {err})") from err


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def _nonempty(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"empty {what}")
    return value


def _join_instruction(instruction: str, extra) -> str:
    instruction = _nonempty(instruction, "instruction")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise ValueError(f"field 'input' is {type(extra).__name__}, expected a string")
    extra = extra.strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def convert_alpaca(record: Any) -> list[list[dict[str, str]]]:
    """Alpaca-style {instruction, input, output|response[, history]} -> one conversation."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    answer_key = "output" if "output" in record else "response"
    messages: list[dict[str, str]] = []
    for turn in record.get("history") or []:
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError("history must be a list of [user, assistant] string pairs")
        messages.append({"role": "user", "content": _nonempty(turn[0], "history user turn")})
        messages.append({"role": "assistant", "content": _nonempty(turn[1], "history assistant turn")})
    user = _join_instruction(_text(record, "instruction"), record.get("input"))
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _nonempty(_text(record, answer_key), answer_key)})
    return [messages]


def convert_self_instruct(record: Any) -> list[list[dict[str, str]]]:
    """Self-Instruct seed task {instruction, instances: [{input, output}]} -> one conversation per instance."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError("missing or empty 'instances'")
    instruction = _text(record, "instruction")
    out = []
    for instance in instances:
        if not isinstance(instance, dict):
            raise ValueError("each instance must be an object")
        out.append(
            [
                {"role": "user", "content": _join_instruction(instruction, instance.get("input"))},
                {"role": "assistant", "content": _nonempty(_text(instance, "output"), "output")},
            ]
        )
    return out


def convert_prompt_completion(record: Any) -> list[list[dict[str, str]]]:
    """{prompt, completion} (T0 / P3 style; a trailing <|endoftext|> marker is removed)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    completion = _text(record, "completion").rstrip().removesuffix("<|endoftext|>")
    return [
        [
            {"role": "user", "content": _nonempty(_text(record, "prompt"), "prompt")},
            {"role": "assistant", "content": _nonempty(completion, "completion")},
        ]
    ]


def convert_flan_cot(record: Any) -> list[list[dict[str, str]]]:
    """FLAN v2 CoT TSV row [question, answer, rationale] -> rationale then the answer."""
    if not isinstance(record, list) or len(record) != 3:
        n = len(record) if isinstance(record, list) else "?"
        raise ValueError(f"expected 3 tab-separated columns (question, answer, rationale), got {n}")
    question, answer, rationale = (field.replace("\\n", "\n") for field in record)
    question = _nonempty(question, "question")
    answer = _nonempty(answer, "answer")
    rationale = _nonempty(rationale, "rationale")
    return [
        [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{rationale} So the answer is {answer}."},
        ]
    ]


def convert_gsm8k(record: Any) -> list[list[dict[str, str]]]:
    """GSM8K {question, answer}; the answer keeps its <<calc>> annotations and '#### N' line."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    answer = _nonempty(_text(record, "answer"), "answer")
    if not re.search(r"####\s*-?[\d,]*\.?\d+\s*$", answer):
        raise ValueError("answer has no '#### <number>' line")
    return [
        [
            {"role": "user", "content": _nonempty(_text(record, "question"), "question")},
            {"role": "assistant", "content": answer},
        ]
    ]


def convert_messages(record: Any) -> list[list[dict[str, str]]]:
    """open-instruct / LESS rows {"dataset", "id", "messages": [{"role", "content"}, ...]} (users' own pools).

    Messages are numbered from 1 in errors. The row's ``id`` and ``dataset`` are read by :func:`row_provenance`."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if "messages" not in record:
        raise ValueError("missing field 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"field 'messages' is {type(messages).__name__}, expected a list of {{role, content}} objects")
    if not messages:
        raise ValueError("field 'messages' is an empty list")
    out = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is {type(message).__name__}, expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' is {type(content).__name__}, expected a string")
        if not content.strip():
            raise ValueError(f"message {i}: empty content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message (nothing to train on)")
    return [out]


def row_provenance(record: dict) -> tuple[str | None, str | None, bool]:
    """A messages row's own ``id`` (as text, and whether it was an integer) and ``dataset``; absent or null = None."""
    row_id, dataset = record.get("id"), record.get("dataset")
    integer = isinstance(row_id, int) and not isinstance(row_id, bool)
    if row_id is not None and not (integer or isinstance(row_id, str)):
        raise ValueError(f"field 'id' is {type(row_id).__name__}, expected a string or an integer")
    if isinstance(row_id, str) and not row_id.strip():
        raise ValueError("field 'id' is an empty string")
    if dataset is not None and not isinstance(dataset, str):
        raise ValueError(f"field 'dataset' is {type(dataset).__name__}, expected a string")
    return (None if row_id is None else str(row_id)), dataset, integer


CONVERTERS: dict[str, Callable[[Any], list[list[dict[str, str]]]]] = {
    "alpaca": convert_alpaca,
    "self_instruct": convert_self_instruct,
    "prompt_completion": convert_prompt_completion,
    "flan_cot": convert_flan_cot,
    "gsm8k": convert_gsm8k,
    "messages": convert_messages,
}


def expand_files(patterns: list[str | Path]) -> list[Path]:
    """Paths with glob patterns expanded (sorted); a pattern matching nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        pattern = Path(pattern)
        if any(ch in str(pattern) for ch in "*?["):
            matches = sorted(pattern.parent.glob(pattern.name))
            if not matches:
                raise DataError(f"{pattern}: no file matches (is datasets_dir set right?)")
            out.extend(matches)
        else:
            out.append(pattern)
    return out


def read_source(files: list[str | Path], fmt: str, on_malformed: str = "error", stats: ReadStats | None = None) -> Iterator[RawExample]:
    """Yield every conversation in ``files`` (in file, then row order) for source format ``fmt``."""
    if fmt not in CONVERTERS:
        raise DataError(f"unknown source format {fmt!r}; known: {sorted(CONVERTERS)}")
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    convert = CONVERTERS[fmt]
    stats = stats if stats is not None else ReadStats()
    for path in expand_files(files):
        if not path.exists():
            raise DataError(f"{path}: file not found (is datasets_dir set right?)")
        rows_before = stats.rows
        for row, record in iter_records(path):
            stats.rows += 1
            try:
                if isinstance(record, DataError):
                    raise record
                conversations = convert(record)
                provenance = row_provenance(record) if fmt == "messages" else (None, None, False)
            except (ValueError, TypeError) as err:
                message = str(err) if isinstance(err, DataError) else f"{path}: row {row}: {err}"
                if on_malformed == "error":
                    raise DataError(message) from None
                stats.malformed += 1
                if len(stats.malformed_examples) < 20:
                    stats.malformed_examples.append(message)
                log.debug("skipping malformed row: %s", message)
                continue
            row_id, dataset, integer_id = provenance
            for index, messages in enumerate(conversations):
                origin = f"{path.name}:{row}" if len(conversations) == 1 else f"{path.name}:{row}.{index}"
                yield RawExample(messages, origin, row_id, dataset, integer_id, str(path), row)
        if stats.rows == rows_before:
            if on_malformed == "error":
                raise DataError(f"{path}: empty file, 0 rows read (data.on_malformed: skip counts it instead)")
            stats.empty_files += 1
            log.warning("0 rows read from %s (an empty file, counted)", path)
