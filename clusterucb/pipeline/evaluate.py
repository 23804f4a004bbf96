"""Stage: evaluate a run's final adapter (or the base model) on one target task."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.data.chat import ChatFormat
from clusterucb.infra.devices import base_dtype, device
from clusterucb.infra.io import read_parquet_metadata, write_json, write_parquet
from clusterucb.models.lm import LanguageModel
from clusterucb.models.lora import load_lora
from clusterucb.models.modeling import load_base_model
from clusterucb.tasks import get_task, resolve_settings
from clusterucb.tasks.base import prediction_schema

log = logging.getLogger(__name__)


def load_for_evaluation(model_dir: str, adapter_dir: str | None, dtype: str, dev):
    """The base model in ``dtype`` on ``dev`` with the adapter attached, *not* merged: the LoRA path adds its
    float32 output to the base layer's output exactly as in training. Merging into bfloat16 weights would drop
    every delta below half a bfloat16 ulp of its weight (most of them, early in training), so the evaluated
    model would not be the trained one; unmerged costs r x (in + out) extra multiply-adds per adapted layer."""
    model, tokenizer = load_base_model(model_dir, base_dtype(dtype))
    model = model.to(dev)
    if adapter_dir is not None:
        model = load_lora(model, adapter_dir, trainable=False, device=dev)
    return model.eval(), tokenizer


def evaluate(
    *,
    task: str,
    model_dir: str,
    adapter_dir: str | None,
    test_path: str,
    metrics_out: str,
    predictions_out: str,
    params: dict,
    run: str,
    workers: int = 1,
) -> None:
    """The task's evaluation and the target loss (NLL of the reference answers) with the adapter attached, unmerged."""
    target = get_task(task)
    settings = resolve_settings(target, params["settings"])
    dev = device()  # claim the job's GPU before anything touches CUDA
    model, tokenizer = load_for_evaluation(model_dir, adapter_dir, params.get("base_dtype", "float32"), dev)
    lm = LanguageModel(
        model, tokenizer, ChatFormat(params["chat_template"], tokenizer), dev, params["batch_size"], seed=params["seed"], workers=workers
    )
    examples = pq.read_table(test_path).to_pylist()
    shared = read_parquet_metadata(test_path)["shared"]
    log.info("%s: evaluating %s on %d test examples", task, run, len(examples))
    if not settings.task_metric:
        # The target loss only: generation is most of an evaluation's cost, and where a small model cannot
        # move the metric (few-shot CoT on a 135M model) it buys nothing.
        log.info("%s: task_metric false: target loss only, no %s", task, target.metric)
        metrics, records = {target.metric: None, "n_examples": len(examples)}, []
    else:
        metrics, records = target.evaluate(lm, examples, shared, settings)
    metrics.update(lm.completion_nll([target.loss_example(e) for e in examples], params["max_length"]))
    metrics.update(
        {
            "task": task,
            "run": run,
            "metric": target.metric,
            "score": metrics[target.metric],
            "adapter": adapter_dir,
            "model": model_dir,
            "eval": params,
        }
    )
    write_parquet(pa.Table.from_pylist(records, schema=prediction_schema()), predictions_out, {"task": task, "run": run})
    write_json(metrics, metrics_out)
    score = "not computed" if metrics["score"] is None else f"{metrics['score']:.4f}"
    log.info(
        "%s / %s: %s %s, target loss %.4f on %d test examples",
        task,
        run,
        target.metric,
        score,
        metrics["target_loss"],
        metrics["n_examples"],
    )
