"""Stages: evaluate a trained adapter (or the base model) on the target task, and compare methods."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import yaml
import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.evaluation import EvalSpec, evaluate_gsm8k, target_loss
from clusterucb.io import atomic_path, read_parquet_metadata, write_json, write_parquet
from clusterucb.lora import load_lora
from clusterucb.modeling import load_base_model
from clusterucb.pipeline.model import device

log = logging.getLogger(__name__)


def evaluate(model_dir: str, adapter_dir: str | None, test_path: str, metrics_out: str, predictions_out: str, params: dict, method: str) -> None:
    """GSM8K exact match (few-shot CoT, greedy) and target loss of the model with the adapter merged."""
    spec = EvalSpec(**params)
    dev = device()
    model, tokenizer = load_base_model(model_dir)
    if adapter_dir is not None:
        model = load_lora(model, adapter_dir, trainable=False).merge_and_unload()
    model = model.to(dev).eval()
    rows = pq.read_table(test_path).to_pylist()
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    metrics, records = evaluate_gsm8k(model, tokenizer, rows, spec, context, dev)
    metrics.update(target_loss(model, tokenizer, rows, spec.max_length, spec.batch_size, dev))
    metrics.update({"method": method, "adapter": adapter_dir, "model": model_dir, "eval": params})
    write_parquet(pa.Table.from_pylist(records), predictions_out, {"method": method})
    write_json(metrics, metrics_out)
    log.info("%s: exact match %.4f, target loss %.4f on %d test problems", method, metrics["exact_match"], metrics["target_loss"], metrics["n_examples"])


def compare(methods: list[str], metrics_paths: list[str], selection_paths: dict[str, list[str]], table_out: str, markdown_out: str, config_out: str, config: dict) -> None:
    """One row per method: target metrics and the per-sample gradients its selections computed.

    The resolved configuration is written beside the table, so every number traces back to it.
    """
    rows = []
    for method, metrics_path in zip(methods, metrics_paths):
        metrics = json.loads(Path(metrics_path).read_text())
        selections = [read_parquet_metadata(p) for p in selection_paths.get(method, [])]
        rows.append(
            {
                "method": method,
                "exact_match": metrics["exact_match"],
                "target_loss": metrics["target_loss"],
                "n_test": metrics["n_examples"],
                "epochs": len(selections),
                "selected_per_epoch": int(selections[0]["n_pool"] * selections[0]["top_p"]) if selections else 0,
                "pool_gradients": sum(int(s["n_gradients"]) for s in selections),
                "pool_gradients_per_epoch": "/".join(str(s["n_gradients"]) for s in selections) or "0",
                "pool_size": int(selections[0]["n_pool"]) if selections else None,
            }
        )
    frame = pd.DataFrame(rows).astype({"pool_size": "Int64"})
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), table_out, {"methods": methods, "config": config})
    with atomic_path(config_out) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    with atomic_path(markdown_out) as tmp:
        tmp.write_text(markdown_table(frame))
    log.info("comparison:\n%s", frame.to_string(index=False))


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and value != value):
            return "–"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
