"""Stages: target-task sets, pool table, tokenized pool and validation set."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.data import gsm8k
from clusterucb.data.pool import build_pool, pool_table
from clusterucb.data.tokenize import EncodeStats, encode_messages, encode_prompt_completion, encode_rows, tokens_schema
from clusterucb.io import read_parquet_metadata, write_parquet

log = logging.getLogger(__name__)


def target_schema():
    return pa.schema(
        [
            pa.field("example_id", pa.string(), nullable=False),
            pa.field("subtask", pa.string(), nullable=False),
            pa.field("question", pa.string(), nullable=False),
            pa.field("answer", pa.string(), nullable=False),
            pa.field("gold", pa.string(), nullable=False),
        ]
    )


def prepare_gsm8k(train_path: str, test_path: str, val_out: str, test_out: str, n_val: int, n_test: int, seed: int) -> None:
    """Validation set from the GSM8K train split, evaluation subset from the test split."""
    train_rows = gsm8k.read_gsm8k(train_path)
    test_rows = gsm8k.read_gsm8k(test_path)
    for name, rows, n, out, split in (("validation", train_rows, n_val, val_out, "train"), ("test", test_rows, n_test, test_out, "test")):
        chosen = gsm8k.sample_rows(rows, n, seed)
        table = pa.Table.from_pylist(
            [{"example_id": gsm8k.target_id(split, r["question"]), "subtask": "gsm8k", **r} for r in chosen], schema=target_schema()
        )
        write_parquet(table, out, {"task": "gsm8k", "split": split, "source_file": str(train_path if split == "train" else test_path), "seed": seed})
        log.info("gsm8k %s set: %d of %d %s-split problems", name, len(chosen), len(rows), split)


def build_pool_table(sources: dict, datasets_dir: str, target_files: list[str], out: str, seed: int, on_malformed: str) -> None:
    """The pool, decontaminated against every question of the target sets (validation and test)."""
    questions = []
    for path in target_files:
        questions += pq.read_table(path, columns=["question"]).column("question").to_pylist()
    rows, reports = build_pool(sources, datasets_dir, questions, seed, on_malformed)
    write_parquet(pool_table(rows), out, {"seed": seed, "sources": [asdict(r) for r in reports], "datasets_dir": str(datasets_dir)})
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


def tokenize_target(val_path: str, model_dir: str, out: str, max_length: int) -> None:
    """Validation prompts + answers; an unusable validation example is an error (it would bias the target)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pq.read_table(val_path).to_pylist()
    encode = partial(_encode_val, tokenizer=tokenizer, max_length=max_length)
    stats = EncodeStats()
    records = encode_rows(rows, encode, max_length, "truncate", "error", stats)
    subtask = pa.field("subtask", pa.string(), nullable=False)
    _write_tokens(records, out, stats, {"model_dir": model_dir, "max_length": max_length}, (subtask,), {r["example_id"]: {"subtask": r["subtask"]} for r in rows})


def _encode_val(row: dict, tokenizer, max_length: int):
    prompt, completion = gsm8k.validation_example(row)
    return encode_prompt_completion(prompt, completion, tokenizer, max_length)


def read_tokens(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def token_meta(path: str | Path) -> dict:
    return read_parquet_metadata(path)
