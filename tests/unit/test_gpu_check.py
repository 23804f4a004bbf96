"""benchmarks/gpu_check.py, the one command for a lent GPU machine, runs its CPU-capable part here, so it cannot rot
before the first session that has a GPU: the device-generic tests of tests/unit/test_cuda.py on the CPU, and
benchmarks/gradients.py in bf16 and fp32 on a small model, ending in its one summary line."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_check_quick_on_cpu(datasets, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--datasets", str(datasets), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert last.startswith("gpu_check: status=ok device=cpu") and "bf16~fp32 cos min=" in last, last
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["parts"]["tests"]
    assert tests["passed"] >= 6 and tests["failed"] == tests["errors"] == 0  # the device-generic tests ran, on the CPU
    assert all("GPU" in skip or "pykeops" in skip for skip in tests["skips"])
    for dtype in ("bfloat16", "float32"):
        bench = report["parts"]["bench"][dtype]
        assert bench["rc"] == 0 and bench["samples_per_s"]["c"] > 0 and bench["cosine_min"] > 0.9999
    assert report["bf16_vs_fp32_feature_cosine"]["c"]["min"] > 0.99
    staged = tmp_path / "staged"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--stage", str(staged), "--datasets", str(datasets)], check=True, capture_output=True)
    assert (staged / "datasets" / "gsm8k" / "train.jsonl.gz").exists()
