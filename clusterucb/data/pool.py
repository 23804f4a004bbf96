"""Build the training pool: per-source caps, stable ids, dedup and decontamination."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clusterucb.data.sources import DataError, RawExample, ReadStats, read_source

log = logging.getLogger(__name__)

# Words are runs of Unicode letters and digits, case-folded: TyDiQA's questions are in nine scripts.
_WORD = re.compile(r"[^\W_]+")
NGRAM = 8
MIN_WORDS = 3  # shorter texts ("Why?", "Who is he?") would match ordinary text; they are counted and left out


def example_id(source: str, messages: list[dict[str, str]]) -> str:
    """Stable id from the source name and the conversation content (never a line number)."""
    blob = json.dumps([source, messages], sort_keys=True, ensure_ascii=False).encode()
    return f"{source}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class Decontaminator:
    """Finds pool examples whose non-assistant text contains a target-task text.

    Texts are normalised to case-folded Unicode words. A target text matches when
    the whole normalised text occurs in the example as a run of whole words. Texts
    are indexed by their first ``min(NGRAM, len)`` words, so checking an example
    costs one set lookup per word position and key length, whatever the number
    of target texts. Texts of fewer than ``MIN_WORDS`` words are not used (``too_short``).
    """

    def __init__(self, texts: Iterable[str]):
        self._by_key: dict[tuple[str, ...], list[str]] = {}
        self.too_short = 0
        for text in texts:
            words = _words(text)
            if not words:
                continue
            if len(words) < MIN_WORDS:
                self.too_short += 1
                continue
            self._by_key.setdefault(tuple(words[:NGRAM]), []).append(" ".join(words))
        self._key_lengths = sorted({len(k) for k in self._by_key})

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def contaminated(self, messages: list[dict[str, str]]) -> bool:
        words = _words(" ".join(m["content"] for m in messages if m["role"] != "assistant"))
        if not words:
            return False
        joined = None
        for length in self._key_lengths:
            for start in range(len(words) - length + 1):
                candidates = self._by_key.get(tuple(words[start : start + length]))
                if not candidates:
                    continue
                if joined is None:
                    joined = f" {' '.join(words)} "  # padded: matches are whole words
                if any(f" {text} " in joined for text in candidates):
                    return True
        return False


@dataclass
class SourceReport:
    """What happened to one source's rows; ``duplicates`` and ``contaminated`` are counted among the candidates
    visited before the cap was reached, ``left_by_cap`` is the rest."""

    source: str
    rows_read: int = 0
    malformed: int = 0
    empty_files: int = 0
    duplicate_ids: int = 0  # rows whose own id an earlier row of the source already used (skipped under "skip")
    duplicates: int = 0  # the same conversation again: the first copy in file order is kept
    contaminated: int = 0
    left_by_cap: int = 0
    kept: int = 0
    integer_ids: bool = False  # every row's own id was a JSON integer (exports write them back as integers)
    malformed_examples: list[str] = field(default_factory=list)


def _drop_duplicate_ids(name: str, examples: list[RawExample], on_malformed: str, report: SourceReport) -> list[RawExample]:
    """The examples without a repeated own id (file order): an error naming both rows, or counted skips."""
    first: dict[str, RawExample] = {}
    out = []
    for example in examples:
        if example.id is None:
            out.append(example)
            continue
        earlier = first.get(example.id)
        if earlier is not None and (earlier.path, earlier.row) != (example.path, example.row):
            message = f"data.sources.{name}: id {example.id!r} is used twice: {earlier.path} row {earlier.row} and {example.path} row {example.row}"
            if on_malformed == "error":
                raise DataError(message + " (data.on_malformed: skip keeps the first and counts the rest)")
            report.duplicate_ids += 1
            if len(report.malformed_examples) < 20:
                report.malformed_examples.append(message)
            continue
        first.setdefault(example.id, example)
        out.append(example)
    return out


def build_pool(
    sources: dict[str, dict],
    datasets_dir: str | Path,
    exclude_texts: Iterable[str],
    seed: int,
    on_malformed: str = "error",
) -> tuple[list[dict], list[SourceReport]]:
    """Read every configured source and draw at most ``max_examples`` clean examples from each.

    ``sources`` maps a source name to ``{"format", "files", "max_examples"}``;
    files are absolute or relative to ``datasets_dir``. A repeated own ``id``
    within a source is an error naming both rows (or a counted skip under
    ``on_malformed: skip``). Within a source, candidates are visited in a seeded
    random order; repeated conversations and examples containing a target-task
    text are skipped (and counted) until the cap is reached. A repeated
    conversation is represented by its first copy in file order (its id, origin
    and dataset), whichever copy the draw visited first. Rows come out grouped
    by source (config order), in source-file order.
    """
    decon = Decontaminator(exclude_texts)
    log.info("decontaminating against %d target-task texts (%d of fewer than %d words left out)", len(decon), decon.too_short, MIN_WORDS)
    rows: list[dict] = []
    reports = []
    for source_index, (name, spec) in enumerate(sources.items()):
        files = [Path(datasets_dir) / f for f in spec["files"]]
        stats = ReadStats()
        examples: list[RawExample] = list(read_source(files, spec["format"], on_malformed, stats))
        report = SourceReport(name, rows_read=stats.rows, malformed=stats.malformed, empty_files=stats.empty_files)
        report.malformed_examples = list(stats.malformed_examples)
        examples = _drop_duplicate_ids(name, examples, on_malformed, report)
        report.integer_ids = bool(examples) and all(e.integer_id for e in examples)
        cap = spec.get("max_examples")
        cap = len(examples) if cap is None else int(cap)
        ids = [example_id(name, e.messages) for e in examples]
        canonical: dict[str, int] = {}  # example id -> its first copy in file order
        for index, eid in enumerate(ids):
            canonical.setdefault(eid, index)
        # One generator per source, derived from (seed, source position), so adding a
        # source at the end does not change the others' draws.
        order = np.random.default_rng([seed, source_index]).permutation(len(examples))
        seen: set[str] = set()
        chosen: list[int] = []
        visited = 0
        for index in order:
            if len(chosen) >= cap:
                break
            visited += 1
            eid = ids[index]
            if eid in seen:
                report.duplicates += 1
                continue
            seen.add(eid)
            if decon.contaminated(examples[index].messages):
                report.contaminated += 1
                continue
            chosen.append(canonical[eid])
        report.kept = len(chosen)
        report.left_by_cap = len(examples) - visited
        for index in sorted(chosen):
            example = examples[index]
            rows.append(
                {
                    "example_id": ids[index],
                    "id": example.id,
                    "dataset": example.dataset,
                    "source": name,
                    "origin": example.origin,
                    "messages": example.messages,
                }
            )
        reports.append(report)
        skipped = report.malformed + report.duplicate_ids + report.empty_files
        if skipped:
            log.warning(
                "source %s: skipped %d malformed rows, %d repeated ids, %d empty files, e.g. %s",
                name,
                report.malformed,
                report.duplicate_ids,
                report.empty_files,
                report.malformed_examples[:3],
            )
        log.info(
            "source %s: %d rows read, %d malformed, %d repeated ids, %d duplicates, %d decontaminated, %d left by the cap (%s), %d kept",
            name,
            report.rows_read,
            report.malformed,
            report.duplicate_ids,
            report.duplicates,
            report.contaminated,
            report.left_by_cap,
            cap,
            report.kept,
        )
    if not rows:
        raise ValueError("the pool is empty: no source produced any example")
    return rows, reports


def pool_schema():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("id", pa.string()),  # the row's own id (messages format), null when it has none
            pa.field("dataset", pa.string()),  # the row's own dataset field, null when it has none
            pa.field("source", pa.string(), nullable=False),
            pa.field("origin", pa.string(), nullable=False),
            pa.field("messages", pa.list_(message), nullable=False),
        ]
    )


def pool_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=pool_schema())
