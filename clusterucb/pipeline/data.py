"""Stages: target-task sets, pool table, tokenized pool and validation set."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.chat import ChatFormat
from clusterucb.data.pool import build_pool, pool_table
from clusterucb.data.tokenize import EncodeStats, encode_messages, encode_prompt_completion, encode_rows, tokens_schema
from clusterucb.io import read_parquet_metadata, write_parquet
from clusterucb.tasks import get_task, resolve_settings
from clusterucb.tasks.base import test_schema, validation_schema

log = logging.getLogger(__name__)


def _files(files: dict[str, list[str]]) -> dict[str, list[Path]]:
    return {role: sorted(Path(p) for p in paths) for role, paths in files.items()}


def prepare_validation(task: str, files: dict[str, list[str]], out: str, settings: dict, seed: int) -> None:
    """A task's validation examples (the gradient targets), subtask-contiguous; ``settings`` may hold only the
    task's ``validation_settings`` (the others keep their defaults and are not read)."""
    target = get_task(task)
    resolved = resolve_settings(target, settings)
    rows = target.validation_examples(_files(files), resolved, seed)
    _check_contiguous(rows, out)
    used = {k: v for k, v in resolved.as_dict().items() if k in target.validation_settings}
    write_parquet(pa.Table.from_pylist(rows, schema=validation_schema()), out, {"task": task, "settings": used, "seed": seed})
    log.info("%s validation set: %d examples in %d subtasks", task, len(rows), len({r["subtask"] for r in rows}))


def prepare_test(task: str, files: dict[str, list[str]], out: str, settings: dict, seed: int) -> None:
    """A task's evaluated test examples; what their evaluation needs besides them goes in the metadata ('shared')."""
    target = get_task(task)
    resolved = resolve_settings(target, settings)
    rows, shared = target.test_examples(_files(files), resolved, seed)
    if not rows:
        raise ValueError(f"{task}: the test set is empty")
    used = {k: v for k, v in resolved.as_dict().items() if k in target.test_settings}
    write_parquet(pa.Table.from_pylist(rows, schema=test_schema()), out, {"task": task, "settings": used, "seed": seed, "shared": shared})
    log.info("%s test set: %d examples in %d subtasks", task, len(rows), len({r["subtask"] for r in rows}))


def target_decontamination(task: str, files: dict[str, list[str]], out: str) -> None:
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


def build_pool_table(sources: dict, datasets_dir: str, decontamination_files: list[str], out: str, seed: int, on_malformed: str) -> None:
    """The pool, decontaminated against every text of every listed target task (validation sources and full test splits)."""
    texts = []
    for path in decontamination_files:
        texts += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    rows, reports = build_pool(sources, datasets_dir, texts, seed, on_malformed)
    tasks = [read_parquet_metadata(p)["task"] for p in decontamination_files]
    write_parquet(pool_table(rows), out, {"seed": seed, "sources": [asdict(r) for r in reports], "datasets_dir": str(datasets_dir), "decontaminated_against": tasks})
    by_source = {r.source: r.selected for r in reports}
    log.info("pool: %d examples from %d sources: %s", len(rows), len(reports), by_source)


def _write_tokens(records: list[dict], out: str, stats: EncodeStats, meta: dict, extra_fields=(), extra_values=None) -> None:
    schema = tokens_schema(extra_fields)
    if extra_values:
        for record in records:
            record.update(extra_values[record["example_id"]])
    write_parquet(pa.Table.from_pylist(records, schema=schema), out, {**meta, "encode_stats": stats.as_dict()})
    log.info("tokenized: %s", stats.as_dict())


def tokenize_pool(pool_path: str, model_dir: str, out: str, max_length: int, chat_template: str, overlong: str, on_unusable: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pq.read_table(pool_path, columns=["example_id", "messages"]).to_pylist()

    def encode(row):
        return encode_messages(row["messages"], tokenizer, max_length, chat_template)

    stats = EncodeStats()
    records = encode_rows(rows, encode, max_length, overlong, on_unusable, stats)
    _write_tokens(records, out, stats, {"model_dir": model_dir, "max_length": max_length, "chat_template": chat_template})


def tokenize_target(val_path: str, model_dir: str, out: str, max_length: int, chat_template: str) -> None:
    """Validation prompts + answers in the pool's chat template; an unusable validation example is an error (it would bias the target)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat(chat_template, tokenizer)
    rows = pq.read_table(val_path).to_pylist()

    def encode(row):
        return encode_prompt_completion(chat.prompt(row["user"], row["assistant_prefix"]), row["completion"], tokenizer, max_length, chat.add_special_tokens)

    stats = EncodeStats()
    try:
        records = encode_rows(rows, encode, max_length, "truncate", "error", stats)
    except ValueError as err:
        raise ValueError(f"{val_path}: {err}: its prompt alone is longer; raise data.val_max_length") from None
    subtask = pa.field("subtask", pa.string(), nullable=False)
    meta = {"model_dir": model_dir, "max_length": max_length, "chat_template": chat_template, "task": read_parquet_metadata(val_path)["task"]}
    _write_tokens(records, out, stats, meta, (subtask,), {r["example_id"]: {"subtask": r["subtask"]} for r in rows})


def pool_size(path: str | Path) -> int:
    """Rows of a Parquet table, from its footer (no row is read)."""
    return pq.read_metadata(path).num_rows


def pool_ids(path: str | Path) -> list[str]:
    return pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist()


def read_tokens(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def token_meta(path: str | Path) -> dict:
    return read_parquet_metadata(path)
