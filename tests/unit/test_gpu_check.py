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
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--datasets",
            str(datasets),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
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
    assert report["parts"]["dropout"]["keyed_ms"] > 0 and "dropout_mask=" in last
    staged = tmp_path / "staged"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--stage", str(staged), "--datasets", str(datasets)],
        check=True,
        capture_output=True,
    )
    assert (staged / "datasets" / "gsm8k" / "train.jsonl.gz").exists()


def test_the_gpu_only_parts_build_their_model_and_estimate(datasets, tmp_path):
    """What only the GPU run reaches: the ~1.1B Llama's directory (config + a tokenizer trained here) and the
    memory estimate it is compared with."""
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    from transformers import AutoConfig, AutoTokenizer

    from clusterucb.infra.resources import ModelShape

    run = gpu_check.Run(argparse.Namespace(out=str(tmp_path), device="cuda", quick=False, budget_s=60))
    model_dir = gpu_check.llama_1b_dir(run, datasets)
    config, tokenizer = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (2048, 22, 4, 32000)
    assert 20_000 < len(tokenizer) <= 32000 and tokenizer.pad_token_id is not None
    assert 1.0e9 < ModelShape.from_hf_config(gpu_check.LLAMA_1B).n_params < 1.3e9
    bf16, fp32 = gpu_check.memory_estimate("bfloat16", 4096, 36_000_000), gpu_check.memory_estimate("float32", 4096, 36_000_000)
    assert 8_000 < bf16 < fp32 < 40_000
