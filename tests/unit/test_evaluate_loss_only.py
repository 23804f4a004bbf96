"""task_metric: false evaluates the target loss only (no generation), the same loss as the full evaluation."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from clusterucb.pipeline.data import prepare_test
from clusterucb.pipeline.evaluate import evaluate
from clusterucb.tasks import get_task, resolve_settings, task_names


@pytest.mark.parametrize("name", task_names())
def test_every_task_takes_task_metric(name):
    assert resolve_settings(get_task(name), {"task_metric": False}).task_metric is False
    assert resolve_settings(get_task(name), {}).task_metric is True  # the paper's: both
    assert resolve_settings(get_task(name), {"task_metric": None}).task_metric is True


def test_loss_only_skips_the_task_metric_and_keeps_the_target_loss(tmp_path, datasets, monkeypatch):
    from tinymodels import saved_tiny_llama

    task = get_task("gsm8k")
    files = {role: [str(p) for p in sorted(datasets.glob(pattern))] for role, pattern in task.data_files().items()}
    test_path = tmp_path / "test.parquet"
    prepare_test(task="gsm8k", files=files, out=str(test_path), settings={"max_per_subtask": 3, "n_shot": 1}, seed=0)
    model_dir = saved_tiny_llama(tmp_path / "base")

    def run(name: str, **settings) -> dict:
        params = {
            "settings": {"max_per_subtask": 3, "n_shot": 1, "max_new_tokens": 4, **settings},
            "chat_template": "tulu",
            "max_length": 512,
            "seed": 0,
            "base_dtype": "float32",
            "batch_size": 2,
        }
        metrics_out, predictions_out = tmp_path / f"{name}.json", tmp_path / f"{name}.parquet"
        evaluate(
            task="gsm8k",
            model_dir=str(model_dir),
            adapter_dir=None,
            test_path=str(test_path),
            metrics_out=str(metrics_out),
            predictions_out=str(predictions_out),
            params=params,
            run="base",
        )
        return {**json.loads(metrics_out.read_text()), "predictions": pq.read_table(predictions_out).num_rows}

    both = run("both")
    assert both["score"] is not None and both["predictions"] == 3

    def no_generation(*args, **kwargs):
        raise AssertionError("the task's evaluation ran under task_metric: false")

    monkeypatch.setattr(type(task), "evaluate", no_generation)
    loss_only = run("loss_only", task_metric=False)
    assert loss_only["score"] is None and loss_only[task.metric] is None and loss_only["predictions"] == 0
    assert loss_only["n_examples"] == 3 and loss_only["target_tokens"] == both["target_tokens"]
    assert loss_only["target_loss"] == pytest.approx(both["target_loss"], rel=1e-6)
