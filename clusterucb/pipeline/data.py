"""Stages: target-task sets, pool table, tokenized pool and validation set."""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.data.chat import ChatFormat
from clusterucb.data.pool import build_pool, pool_table
from clusterucb.data.tokenize import EncodeStats, encode_messages, encode_prompt_completion, encode_rows
from clusterucb.data.tokens import TokenTable, count_rows, tokens_schema, write_tokens
from clusterucb.infra.io import read_parquet_metadata, write_parquet
from clusterucb.tasks import get_task, resolve_settings
from clusterucb.tasks.base import test_schema, validation_schema

log = logging.getLogger(__name__)


def _files(files: dict[str, list[str]]) -> dict[str, list[Path]]:
    return {role: sorted(Path(p) for p in paths) for role, paths in files.items()}


def prepare_validation(*, task: str, files: dict[str, list[str]], out: str, settings: dict, seed: int) -> None:
    """A task's validation examples (the gradient targets), subtask-contiguous; ``settings`` may hold only the
    task's ``validation_settings`` (the others keep their defaults and are not read)."""
    target = get_task(task)
    resolved = resolve_settings(target, settings)
    rows = target.validation_examples(_files(files), resolved, seed)
    _check_contiguous(rows, out)
    used = {k: v for k, v in resolved.as_dict().items() if k in target.validation_settings}
    write_parquet(pa.Table.from_pylist(rows, schema=validation_schema()), out, {"task": task, "settings": used, "seed": seed})
    log.info("%s validation set: %d examples in %d subtasks", task, len(rows), len({r["subtask"] for r in rows}))


def prepare_test(*, task: str, files: dict[str, list[str]], out: str, settings: dict, seed: int) -> None:
    """A task's evaluated test examples; what their evaluation needs besides them goes in the metadata ('shared')."""
    target = get_task(task)
    resolved = resolve_settings(target, settings)
    rows, shared = target.test_examples(_files(files), resolved, seed)
    if not rows:
        raise ValueError(f"{task}: the test set is empty")
    used = {k: v for k, v in resolved.as_dict().items() if k in target.test_settings}
    write_parquet(pa.Table.from_pylist(rows, schema=test_schema()), out, {"task": task, "settings": used, "seed": seed, "shared": shared})
    log.info("%s test set: %d examples in %d subtasks", task, len(rows), len({r["subtask"] for r in rows}))


def target_decontamination(*, task: str, files: dict[str, list[str]], out: str) -> None:
    """Every text of a task's validation source and full test split: no pool example may contain one."""
    texts = get_task(task).decontamination_texts(_files(files))
    schema = pa.schema([pa.field("text", pa.string(), nullable=False)])
    write_parquet(pa.Table.from_pydict({"text": texts}, schema=schema), out, {"task": task})
    log.info("%s: %d texts to decontaminate the pool against", task, len(texts))


def _check_contiguous(rows: list[dict], out: str) -> None:
    """Scoring averages per subtask; the official code reshapes (N, S, m), so keep each subtask's rows together."""
    seen, previous = set(), None
    for row in rows:
        if row["subtask"] != previous:
            if row["subtask"] in seen:
                raise ValueError(f"{out}: subtask {row['subtask']!r} is not contiguous")
            seen.add(row["subtask"])
            previous = row["subtask"]


def build_pool_table(*, sources: dict, datasets_dir: str, decontamination_files: list[str], out: str, seed: int, on_malformed: str) -> None:
    """The pool, decontaminated against every text of every listed target task (validation sources and full test splits)."""
    texts = []
    for path in decontamination_files:
        texts += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    rows, reports = build_pool(sources, datasets_dir, texts, seed, on_malformed)
    tasks = [read_parquet_metadata(p)["task"] for p in decontamination_files]
    write_parquet(
        pool_table(rows),
        out,
        {"seed": seed, "sources": [asdict(r) for r in reports], "datasets_dir": str(datasets_dir), "decontaminated_against": tasks},
    )
    by_source = {r.source: r.kept for r in reports}
    log.info("pool: %d examples from %d sources: %s", len(rows), len(reports), by_source)


# Rows per tokenization chunk: fixed, not derived from the worker count, so that the file does not depend on it.
TOKENIZE_CHUNK_ROWS = 2048


class _PoolEncoder:
    """Encodes chunks of pool rows; built once per worker process (the tokenizer load)."""

    def __init__(self, model_dir: str, max_length: int, chat_template: str, overlong: str, on_unusable: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.settings = (max_length, chat_template, overlong, on_unusable)

    def __call__(self, rows: list[dict]) -> tuple[pa.Table, dict]:
        max_length, chat_template, overlong, on_unusable = self.settings
        stats = EncodeStats()
        records = encode_rows(
            rows,
            lambda row: encode_messages(row["messages"], self.tokenizer, max_length, chat_template),
            max_length,
            overlong,
            on_unusable,
            stats,
        )
        return pa.Table.from_pylist(records, schema=tokens_schema()), stats.as_dict()


_WORKER_ENCODER: _PoolEncoder | None = None


def _init_worker(*args) -> None:
    global _WORKER_ENCODER
    from clusterucb.infra.logsetup import set_threads

    set_threads(1)
    _WORKER_ENCODER = _PoolEncoder(*args)


def _encode_in_worker(rows: list[dict]) -> tuple[pa.Table, dict]:
    return _WORKER_ENCODER(rows)


def _encoded_chunks(pool_path: str, encoder_args: tuple, workers: int) -> Iterator[tuple[pa.Table, dict]]:
    """The pool's chunks encoded in order, ``workers`` processes at a time; at most 2 chunks per worker in flight."""
    chunks = (
        batch.to_pylist()
        for batch in pq.ParquetFile(pool_path).iter_batches(batch_size=TOKENIZE_CHUNK_ROWS, columns=["example_id", "messages"])
    )
    if workers <= 1:
        encoder = _PoolEncoder(*encoder_args)
        yield from (encoder(rows) for rows in chunks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a forked worker would inherit the tokenizers library's thread pool (it disables itself and warns)
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=encoder_args
    ) as pool:
        pending = deque()
        for rows in chunks:
            pending.append(pool.submit(_encode_in_worker, rows))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _read_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file read one at a time (not mapped: the copy's memory stays one batch)."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def tokenize_pool(
    *,
    pool_path: str,
    model_dir: str,
    out: str,
    max_length: int,
    chat_template: str,
    overlong: str,
    on_unusable: str,
    workers: int = 1,
    scratch: str | None = None,
) -> None:
    """The tokenized pool, encoded in chunks of ``TOKENIZE_CHUNK_ROWS`` by ``workers`` processes.

    Memory is bounded by the chunks in flight, not the pool. The chunks are
    streamed into a file in ``scratch`` (or beside ``out``), then copied into
    ``out`` under a schema that carries the totals; the output is the same
    file, byte for byte, whatever ``workers`` is. With ``workers > 1`` the
    workers are spawned, and spawn re-imports the caller's main script: its
    top-level code must sit under ``if __name__ == "__main__":``.
    """
    encoder_args = (model_dir, max_length, chat_template, overlong, on_unusable)
    staging = Path(scratch) if scratch else Path(out).parent / f".{Path(out).name}.staging"
    staging.mkdir(parents=True, exist_ok=True)
    body = staging / "chunks.arrow"
    totals = EncodeStats()
    n_chunks = 0

    def tables():
        nonlocal n_chunks
        for table, stats in _encoded_chunks(pool_path, encoder_args, workers):
            for key, value in stats.items():
                setattr(totals, key, getattr(totals, key) + value)
            n_chunks += 1
            if n_chunks % 10 == 0:
                log.info("tokenized %d rows (%d chunks)", totals.total, n_chunks)
            yield table

    started = time.perf_counter()
    write_tokens(tables(), tokens_schema(), body)
    meta = {"model_dir": model_dir, "max_length": max_length, "chat_template": chat_template, "encode_stats": totals.as_dict()}
    rows = write_tokens(_read_batches(body), tokens_schema(metadata=meta), out)
    shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info(
        "tokenized: %s in %.1f s (%.0f rows/s, %d workers); %d rows written",
        totals.as_dict(),
        seconds,
        totals.total / max(seconds, 1e-9),
        workers,
        rows,
    )


def tokenize_target(*, val_path: str, model_dir: str, out: str, max_length: int, chat_template: str) -> None:
    """Validation prompts + answers in the pool's chat template; an unusable validation example is an error (it would bias the target)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat(chat_template, tokenizer)
    rows = pq.read_table(val_path).to_pylist()

    def encode(row):
        return encode_prompt_completion(
            chat.prompt(row["user"], row["assistant_prefix"]), row["completion"], tokenizer, max_length, chat.add_special_tokens
        )

    stats = EncodeStats()
    try:
        records = encode_rows(rows, encode, max_length, "truncate", "error", stats)
    except ValueError as err:
        raise ValueError(f"{val_path}: {err}: its prompt alone is longer; raise data.val_max_length") from None
    subtask_of = {r["example_id"]: r["subtask"] for r in rows}
    for record in records:
        record["subtask"] = subtask_of[record["example_id"]]
    meta = {
        "model_dir": model_dir,
        "max_length": max_length,
        "chat_template": chat_template,
        "task": read_parquet_metadata(val_path)["task"],
        "encode_stats": stats.as_dict(),
    }
    schema = tokens_schema((pa.field("subtask", pa.string(), nullable=False),), meta)
    write_tokens([pa.Table.from_pylist(records, schema=schema)], schema, out)
    log.info("tokenized: %s", stats.as_dict())


def pool_size(path: str | Path) -> int:
    """Rows of a tokenized file, from its batch headers (no row is read)."""
    return count_rows(path)


def pool_ids(path: str | Path) -> list[str]:
    return TokenTable.open(path).ids()


def read_tokens(path: str | Path) -> TokenTable:
    """A tokenized file, memory-mapped: rows are read when touched."""
    return TokenTable.open(path)
