"""The workflow prints each heavy job's GPU memory estimate at start and warns before a job sure to run out
of the card's memory (precision.gpu_memory_gb; clusterucb/infra/resources.py gpu_plan)."""

from __future__ import annotations

import pytest
from dag import run

pytestmark = pytest.mark.workflow


def test_a_dry_run_prints_the_gpu_plan_and_warns_before_a_sure_oom(datasets, tmp_path):
    quiet = run(tmp_path, datasets, "-n")
    assert "GPU memory estimate" not in quiet.stderr  # a CPU run (neither key set) is not told about GPUs
    proc = run(tmp_path, datasets, "-n", config=("precision={gpu_memory_gb: 0.05}",))
    assert "GPU memory estimate per job" in proc.stderr and "card: 0.05 GB" in proc.stderr
    for job in (
        "training (warmup_lora",
        "pool gradients (grads_pool_shard",
        "validation gradients",
        "evaluation (evaluate",
        "k-means (kmeans)",
    ):
        assert job in proc.stderr, job
    sure = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:") and "sure to run out of GPU memory" in line]
    assert any("training" in line and "even one example" in line for line in sure), proc.stderr[-3000:]
    roomy = run(tmp_path, datasets, "-n", config=("precision={gpu_memory_gb: 80}",))
    assert "GPU memory estimate per job" in roomy.stderr and "sure to run out" not in roomy.stderr
