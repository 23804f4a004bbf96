"""Stage: evaluate a run's final adapter (or the base model) on the target task."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.evaluation import EvalSpec, evaluate_gsm8k, target_loss
from clusterucb.io import write_json, write_parquet
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

