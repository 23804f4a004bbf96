"""One command that checks this code on a GPU machine it has never run on, measures it, and says so in one line.

    python benchmarks/gpu_check.py --datasets resources/gpu_check/datasets   # a bare GPU machine: <= 8 min on one H100
    python benchmarks/gpu_check.py --device cpu --quick                      # its CPU-capable part (CI: tests/unit/test_gpu_check.py)
    python benchmarks/gpu_check.py --stage resources/gpu_check               # here, before: copy what the GPU machine reads

What the GPU machine needs: Python with torch (a CUDA build), transformers, peft, safetensors, pyarrow, numpy and
pytest; no network, and no snakemake, pykeops or faiss (KeOps is checked only where ``import pykeops`` works; the
check says "keops=not importable" otherwise). From here it needs the repository's working tree (clusterucb/,
tests/, benchmarks/: under 2 MB) and the five dataset files the benchmark's real pool samples come from (4.5 MB),
which ``--stage DIR`` copies from ``--datasets`` (default $CLUSTERUCB_DATASETS or ../shared/datasets) into
DIR/datasets. With the device tool of these sessions, from the repository root::

    python benchmarks/gpu_check.py --stage resources/gpu_check
    run(command="python benchmarks/gpu_check.py --datasets resources/gpu_check/datasets",
        carry=["resources/gpu_check"], timeout_s=600)

(resources/ is git-ignored, hence ``carry``). To check KeOps too, carry its pure-Python wheels (built here with
``pip wheel pykeops==2.3 keopscore==2.3 pybind11 --no-deps -w resources/gpu_check/wheels``; under 1 MB) and pass
``--wheels resources/gpu_check/wheels``: they are installed with ``pip install --no-index --no-deps`` first. KeOps
then compiles its kernels at run time with the machine's nvrtc and CUDA headers; where those are missing its test
fails and says why (the workflow's default k-means does not use KeOps).

It runs, in this order, each part with a time limit within ``--budget-s`` (450 s on a GPU):

1. ``nvidia-smi`` and the versions of Python, torch (its CUDA), transformers, peft, numpy, pyarrow;
2. ``tests/unit/test_cuda.py`` on the device (``CLUSTERUCB_TEST_DEVICE``): CUDA against the CPU and a CUDA batch-1
   loop on four architectures; GPU features repeating bit for bit; sjlt under bucket collisions; training with
   dropout on the CPU trajectory; bf16 through the workflow's load path against fp32 (feature cosine); gradient
   checkpointing; the OOM back-off forced with ``torch.cuda.set_per_process_memory_fraction`` (gradients and
   training, nothing dropped, same results); batch-1 repeatability on 512-token sequences; a training job killed
   and resumed, dropout on, bit for bit; bf16 evaluation unmerged (the trained model) against merged; batched
   against batch-1 greedy generation; host syncs per gradient batch; k-means KeOps against torch at d = 8192;
3. ``benchmarks/gradients.py --device cuda`` on the rows that need nothing off the machine (a, a-sjlt with our
   projectors, b, c, c', c-dense) for a ~1.1B random-init Llama (TinyLlama's shape: hidden 2048, 22 layers, GQA
   32/4 heads, vocabulary 32000; its tokenizer trained here on the pool samples), LoRA r=128 on q, k, v, o, base
   in bfloat16 then float32: samples/s per row, exactness, peak memory against clusterucb/infra/resources.py's estimate,
   and the agreement of the bf16 features with the fp32 ones (cosine per sample).

Everything it measured goes to ``$OUT`` (or ``--out``): gpu_check.json, the pytest log and junit XML, each
benchmark's log and features. The last line printed is one summary:
``gpu_check: status=ok|FAIL device=... tests=P passed/F failed/S skipped ... c_bf16=... samples/s ...``.
The exit status is 0 only when every test passed (skips aside) and both benchmark runs finished.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What benchmarks/gradients.py reads: its pool sources, and GSM8K (its validation examples, when --val > 0).
DATASET_FILES = (
    "alpaca/random_9k.json.gz",
    "dolly/dolly_3k.json.gz",
    "gpteacher/codegen-instruct.json.gz",
    "flan_v2_cot/ecqa_train.tsv.gz",
    "gsm8k/train.jsonl.gz",
)
# TinyLlama-1.1B's shape (random init: timings and agreement need no trained weights).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


def default_datasets() -> Path:
    return Path(os.environ.get("CLUSTERUCB_DATASETS") or REPO.parent / "shared" / "datasets")


def stage(target: Path, datasets: Path) -> None:
    """Copy the dataset files the check reads into ``target``/datasets (same layout), for ``carry``."""
    for relative in DATASET_FILES:
        source, dest = datasets / relative, target / "datasets" / relative
        if not source.exists():
            raise SystemExit(f"--stage: {source} is missing (pass --datasets)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(
        f"staged {len(DATASET_FILES)} dataset files in {target}/datasets ({size / 2**20:.1f} MB); on the GPU machine run, from the repository root:"
    )
    print(f"  python benchmarks/gpu_check.py --datasets {target}/datasets      (carry {target})")


class Run:
    """The check's state: where it writes, how much time is left, what it found."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "out" / "gpu_check")
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.report: dict = {"device_requested": args.device, "quick": args.quick, "parts": {}}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def command(self, name: str, command: list[str], limit_s: float, env: dict | None = None) -> dict:
        """Run ``command`` with its output in OUT/<name>.log, within ``limit_s`` and the budget left."""
        limit = max(1.0, min(limit_s, self.left()))
        log = self.out / f"{name}.log"
        began = time.monotonic()
        print(f"[{time.monotonic() - self.start:6.1f} s] {name}: {' '.join(command)} (limit {limit:.0f} s)", flush=True)
        with open(log, "w") as handle:
            try:
                proc = subprocess.run(
                    command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=limit
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = time.monotonic() - began
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        print("\n".join(f"    {line}" for line in tail), flush=True)
        return {"rc": rc, "seconds": round(seconds, 1), "log": str(log)}


def environment(run: Run) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "transformers", "peft", "numpy", "pyarrow", "safetensors", "pytest"):
        try:
            info[module] = __import__(module).__version__
        except Exception as error:  # a missing package is a finding, not a crash
            info[module] = f"missing ({type(error).__name__})"
    info["pykeops"] = "importable" if importlib.util.find_spec("pykeops") else "not importable"
    import torch

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            {
                "gpu": props.name,
                "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "gpu_count": torch.cuda.device_count(),
                "bf16_supported": torch.cuda.is_bf16_supported(),
            }
        )
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            (run.out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
            print(smi.stdout, flush=True)
            info["nvidia_smi"] = "nvidia-smi.txt"
        except subprocess.TimeoutExpired:
            info["nvidia_smi"] = "timed out"
    else:
        info["nvidia_smi"] = "not found"
    print("versions: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return info


def install_wheels(run: Run, wheels: Path) -> dict:
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return {"rc": "no wheels", "dir": str(wheels)}
    return run.command("install_wheels", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *files], 120)


def cuda_tests(run: Run, device: str) -> dict:
    junit = run.out / "test_cuda.xml"
    env = {"CLUSTERUCB_TEST_DEVICE": device, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # tiny models: one thread (a loaded CI machine makes two spin)
    result = run.command(
        "test_cuda",
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/unit/test_cuda.py",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-q",
            "-rs",
            "-s",
            f"--junitxml={junit}",
        ],
        300 if device == "cuda" else 120,
        env,
    )
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name")
            if case.find("failure") is not None:
                counts["failed"] += 1
                counts["failures"].append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                counts["failures"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                counts["skips"].append(f"{name}: {case.find('skipped').get('message', '')}")
            else:
                counts["passed"] += 1
    log = Path(result["log"]).read_text(errors="replace")
    counts["measured"] = [
        line.strip() for line in log.splitlines() if line.startswith(("bf16 vs fp32", "bf16 target loss", "k-means d=8192"))
    ]
    if any("k-means d=8192" in m for m in counts["measured"]):
        counts["keops"] = "checked"
    elif not importlib.util.find_spec("pykeops"):
        counts["keops"] = "not importable (KeOps check skipped)"
    else:
        counts["keops"] = f"not run on {device}"
    return {**result, **counts}


def llama_1b_dir(run: Run, datasets: Path) -> Path:
    """A directory with TinyLlama-1.1B's config and a 32k BPE tokenizer trained on the benchmark's pool sources."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gradients import pool_conversations
    from transformers import LlamaConfig

    from clusterucb.data.tokenize import concat_messages
    from clusterucb.models.modeling import train_tokenizer

    target = run.out / "llama-1b"
    texts = [concat_messages(c, "</s>") for c in pool_conversations(datasets, 2000, seed=1)]
    tokenizer = train_tokenizer(texts, LLAMA_1B["vocab_size"])
    tokenizer.save_pretrained(str(target))
    config = LlamaConfig(
        **LLAMA_1B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(str(target))
    return target


def benchmark(run: Run, device: str, datasets: Path, dtype: str, model: str) -> dict:
    saved = run.out / f"gradients-{dtype}.pt"
    common = [
        "--device",
        device,
        "--datasets",
        str(datasets),
        "--base-dtype",
        dtype,
        "--less-projector",
        "ours",
        "--quality",
        "no",
        "--agreement",
        "no",
        "--val",
        "0",
        "--save-features",
        str(saved),
        "--repeats",  # one timed run a row, as before gradients.py repeated them: the check's time limits
        "1",
    ]
    if run.args.quick:
        sizes = [
            "--model",
            "tiny",
            "--samples",
            "16",
            "--quality-samples",
            "300",
            "--max-length",
            "64",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--rank",
            "8",
            "--rows",
            "a,a-sjlt,b,c,c-dense",
        ]
    else:
        sizes = [
            "--model",
            model,
            "--random-init",
            "--samples",
            str(run.args.samples),
            "--quality-samples",
            str(run.args.samples),
            "--max-length",
            "256",
            "--batch-size",
            "16",
            "--rank",
            "128",
            "--rows",
            "a,a-sjlt,b,c,c-dense",
        ]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "TQDM_DISABLE": "1"}
    result = run.command(
        f"gradients-{dtype}", [sys.executable, "benchmarks/gradients.py", *sizes, *common], 60 if run.args.quick else 200, env
    )
    if result["rc"] != 0 or not saved.exists():
        return result
    import torch

    data = torch.load(saved, weights_only=False)
    result.update(
        {k: data[k] for k in ("samples_per_s", "cosine_min", "peak_mb", "peak_c_mb", "max_batch_tokens", "grad_dim", "samples", "model")}
    )
    result["exactness"] = [[what, cosine] for what, cosine in data["exactness"]]
    result["features"] = data["features"]
    return result


def dropout_cost(device: str, quick: bool) -> dict:
    """The per-example dropout masks (clusterucb/training/dropout.py: an int64 hash per element, so that
    micro_batch changes no mask) against torch's own generator-drawn mask, for one LoRA input of a 7B model
    (2 examples x 2048 tokens x 4096 features; --quick: 2 x 256 x 256), ms per module: what keyed dropout adds
    to a training step is this difference times the LoRA modules (128 for a 7B on q, k, v, o)."""
    import torch

    from clusterucb.training.dropout import keep_mask

    shape = (2, 256, 256) if quick else (2, 2048, 4096)
    dev = torch.device(device)

    def timed(fn) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / 5 * 1000

    hashed = timed(lambda: keep_mask([1, 2], 7, shape, 0.1, dev))
    drawn = timed(lambda: torch.rand(shape, device=dev) >= 0.1)
    return {
        "shape": list(shape),
        "keyed_ms": round(hashed, 3),
        "generator_ms": round(drawn, 3),
        "ratio": round(hashed / max(drawn, 1e-9), 2),
    }


def memory_estimate(dtype: str, tokens: int, grad_dim: int) -> float:
    """clusterucb/infra/resources.py's estimate of the gradient pass (its "pool gradients" row) for the 1B model at the
    benchmark's largest batch, MB, without the CUDA context (torch.cuda.max_memory_allocated does not see it)."""
    from clusterucb.infra.resources import DTYPE_BYTES, PROJECTOR_CACHE_MB, ModelShape, activations_mb

    shape = ModelShape.from_hf_config(LLAMA_1B)
    mb = 2**20
    weights = shape.n_params * DTYPE_BYTES[dtype] / mb
    state = min(grad_dim * 12 / mb, PROJECTOR_CACHE_MB) + 2 * grad_dim * 4 / mb  # sjlt cache, Adam m and v
    return weights + grad_dim * 8 / mb + state + activations_mb(shape, dtype, tokens, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small models and sizes: the CPU smoke test CI runs")
    parser.add_argument(
        "--datasets", type=Path, default=None, help="the staged dataset files (default $CLUSTERUCB_DATASETS or ../shared/datasets)"
    )
    parser.add_argument("--out", default=None, help="where results go (default $OUT, else benchmarks/out/gpu_check)")
    parser.add_argument("--budget-s", type=float, default=None, help="time for everything (default 450 on cuda, 240 on cpu)")
    parser.add_argument("--samples", type=int, default=96, help="pool samples per benchmark row on the GPU")
    parser.add_argument("--skip", default="", help="parts to leave out, comma-separated: tests, bench, dropout")
    parser.add_argument("--wheels", type=Path, default=None, help="install these carried wheels first (pip --no-index --no-deps)")
    parser.add_argument(
        "--stage", type=Path, default=None, help="only copy the dataset files the check reads into STAGE/datasets, then exit"
    )
    args = parser.parse_args()
    datasets = (args.datasets or default_datasets()).resolve()
    if args.stage:
        stage(args.stage, datasets)
        return
    args.budget_s = args.budget_s or (450.0 if args.device == "cuda" else 240.0)
    skip = set(filter(None, args.skip.split(",")))
    run = Run(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: --device cuda but torch sees no GPU (torch.cuda.is_available() is False); --device cpu --quick runs the CPU part"
        )
    report = run.report
    report["environment"] = environment(run)
    if args.wheels:
        report["parts"]["wheels"] = install_wheels(run, args.wheels)
    if "tests" not in skip:
        report["parts"]["tests"] = cuda_tests(run, args.device)
    benches = {}
    if "bench" not in skip:
        missing = [f for f in DATASET_FILES if not (datasets / f).exists()]
        if missing:
            report["parts"]["bench"] = {"rc": f"datasets missing in {datasets}: {missing[:2]} (stage them with --stage, carry them)"}
        else:
            model = "tiny" if args.quick else str(llama_1b_dir(run, datasets))
            for dtype in ("bfloat16", "float32"):
                benches[dtype] = benchmark(run, args.device, datasets, dtype, model)
            report["parts"]["bench"] = {d: {k: v for k, v in b.items() if k != "features"} for d, b in benches.items()}
    if "dropout" not in skip:
        report["parts"]["dropout"] = dropout_cost(args.device, args.quick)
    agreement = None
    if all("features" in benches.get(d, {}) for d in ("bfloat16", "float32")):
        cos = {
            row: torch.nn.functional.cosine_similarity(benches["bfloat16"]["features"][row], benches["float32"]["features"][row], dim=1)
            for row in benches["float32"]["features"]
            if row in benches["bfloat16"]["features"]
        }
        agreement = {row: {"min": float(c.min()), "mean": float(c.mean())} for row, c in cos.items()}
        report["bf16_vs_fp32_feature_cosine"] = agreement
        for dtype, bench in benches.items():
            if not args.quick and bench.get("peak_c_mb") == bench.get("peak_c_mb"):  # a number (NaN on the CPU)
                bench_estimate = memory_estimate(dtype, bench["max_batch_tokens"], bench["grad_dim"])
                report["parts"]["bench"][dtype]["estimate_mb"] = round(bench_estimate)

    tests = report["parts"].get("tests", {})
    ok = (tests.get("rc") == 0 if "tests" not in skip else True) and (
        "bench" in skip or (all(b.get("rc") == 0 for b in benches.values()) and len(benches) == 2 and agreement is not None)
    )
    report["status"] = "ok" if ok else "FAIL"
    report["seconds"] = round(time.monotonic() - run.start, 1)
    with open(run.out / "gpu_check.json.tmp", "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    os.replace(run.out / "gpu_check.json.tmp", run.out / "gpu_check.json")

    env = report["environment"]
    parts = [
        f"gpu_check: status={report['status']}",
        f"device={env.get('gpu', 'cpu').replace(' ', '_')}",
        f"torch={env.get('torch')}",
        f"cuda={env.get('torch_cuda')}",
    ]
    if tests:
        parts.append(
            f"tests={tests.get('passed', 0)} passed/{tests.get('failed', 0) + tests.get('errors', 0)} failed/{tests.get('skipped', 0)} skipped"
            + (f" (failed: {','.join(tests['failures'][:3])})" if tests.get("failures") else "")
            + (f" rc={tests['rc']}" if tests.get("rc") not in (0, 1) else "")
        )
        parts.append(f"keops={tests.get('keops')}")
    for dtype, short in (("bfloat16", "bf16"), ("float32", "fp32")):
        bench = benches.get(dtype)
        if bench is None:
            continue
        if "samples_per_s" in bench:
            rate = {row: bench["samples_per_s"].get(row, float("nan")) for row in ("a", "b", "c", "c'")}
            atomic = rate["c'"]
            line = (
                f"c_{short}={rate['c']:.1f}/s (a {rate['a']:.1f}, b {rate['b']:.1f}, c' {atomic:.1f}) exact_min={bench['cosine_min']:.5f}"
            )
            estimate = report["parts"]["bench"][dtype].get("estimate_mb")
            if estimate:
                line += f" peak_c={bench['peak_c_mb'] / 1024:.1f}GB est={estimate / 1024:.1f}GB"
            parts.append(line)
        else:
            parts.append(f"bench_{short}=rc {bench.get('rc')}")
    if agreement and "c" in agreement:
        parts.append(f"bf16~fp32 cos min={agreement['c']['min']:.4f}")
    dropout = report["parts"].get("dropout")
    if dropout:
        parts.append(f"dropout_mask={dropout['keyed_ms']:.2f}ms (torch {dropout['generator_ms']:.2f}ms)")
    parts.append(f"{report['seconds']:.0f}s out={run.out}")
    print(" ".join(parts), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
