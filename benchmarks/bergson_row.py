"""Row (d) of benchmarks/gradients.py: EleutherAI bergson's per-sample gradient collection, with its own projection.

Runs in bergson's own virtual environment: it imports neither ``clusterucb`` nor anything from this repository.

    python3 -m venv .venv-bergson && . .venv-bergson/bin/activate
    pip install torch==2.13.0                       # the CPU wheel first (any other torch pulls CUDA)
    pip install bergson==2.5.1 torch==2.13.0 transformers peft safetensors numpy
    pip uninstall -y torchvision torchaudio         # bergson requires them but never imports them; their PyPI
                                                    # builds need CUDA torch, and transformers then fails to import
    python benchmarks/bergson_row.py --model DIR --adapter DIR --examples FILE.json \
        --proj-dim 8192 --batch-size 16 --threads 2 --out FILE.npz

``--model``: a Hugging Face model directory; ``--adapter``: a PEFT LoRA adapter directory (``save_pretrained``);
``--examples``: a JSON list of ``{"input_ids": [...], "labels": [...]}`` (labels -100 on prompt tokens, aligned
with input_ids, unshifted). ``--out`` gets ``features`` (N, d) float32 in the order of the examples, ``seconds``
(wall time of the timed collection over all N examples; model load and one untimed warm-up batch excluded),
``samples``, ``losses`` (each example's mean token loss) and the settings. ``--val-examples`` (same format,
optional): after the timed pass, untimed, their features with the same projection and without Adam (validation
gradients are plain, as in LESS) go to ``val_features`` (M, d).

What runs is bergson's own code: its model setup (``setup_model_and_peft``, copied because it wants the base-model
path inside the adapter config: fp32, every weight frozen, only the input embeddings require grad so that the
backward reaches its hooks), ``IndexConfig`` / ``GradientProcessor``, ``InMemoryCollector`` (its forward/backward
hooks on the LoRA ``lora_A`` / ``lora_B`` linear modules, per-sample gradients from activations x output
gradients) and ``CollectorComputer`` (its forward, loss and backward). Only the batching is ours: length-sorted
chunks of ``--batch-size`` (as our ``length_batches``), where ``bergson build`` bin-packs by a token budget.

Projection (``--target``):
  global      bergson's ``projection_target="global"``: each LoRA module's flattened per-sample gradient times its
              own [proj_dim, O*I] Rademacher block / sqrt(proj_dim), summed over modules: one dense JL projection
              of the whole LoRA gradient to ``--proj-dim``, as LESS does. The blocks are regenerated (Philox, on the
              CPU in numpy) on every batch, never cached.
  per_module  bergson's default: per module a double-sided projection L G R^T with L [p, O], R [p, I], applied
              to g and a before their outer product (G is never formed): p^2 features per module. p is chosen
              as round(sqrt(proj_dim / modules)), so d = modules * p^2 is only close to ``--proj-dim``.
Loss: bergson's ``loss_reduction="mean"`` (each example's summed token cross-entropy over its own label tokens
divided by their count), which is ours; bergson's default is "sum".
Adam (``--adam-v``): bergson's ``AdamNormalizer`` divides each gradient entry by sqrt(v) + 1e-8 with a fixed v
(an optimizer's exp_avg_sq); it has no first moment and does not update v with the sample's gradient (LESS and
ours do: m'/sqrt(v'+eps)). ``synthetic`` makes a random v for timing; a .safetensors file gives v per LoRA weight
(keys: PeftModel parameter names, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``).
With Adam, bergson forms every per-sample [O, I] gradient before projecting it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch


def load_model(model_dir: str, adapter_dir: str, device: str):
    """bergson.utils.worker_utils.setup_model_and_peft for precision fp32 and a pretrained adapter."""
    from bergson.utils.worker_utils import extract_peft_target_modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device)
    model = PeftModel.from_pretrained(model, adapter_dir, device_map=device, autocast_adapter_dtype=False)
    target_modules = extract_peft_target_modules(model)
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)
    return model, target_modules


def adam_normalizers(model, target_modules: set[str], spec: str) -> dict:
    """bergson AdamNormalizers keyed by the collector's module names (relative to ``model.base_model``)."""
    from bergson.gradients import AdamNormalizer

    if spec == "none":
        return {}
    stored = None
    if spec != "synthetic":
        from safetensors.torch import load_file

        stored = load_file(spec)
    generator = torch.Generator().manual_seed(0)
    normalizers = {}
    for name, param in model.named_parameters():
        module = name.removeprefix("base_model.").removesuffix(".weight")
        if module not in target_modules:
            continue
        if stored is None:  # a plausible late-training scale of squared LoRA gradients
            v = torch.rand(param.shape, generator=generator) * 1e-6 + 1e-9
        else:
            v = stored[name] if name in stored else stored[module]
        normalizers[module] = AdamNormalizer(weight_avg_sq=v.to(param.device, torch.float32).reshape(param.shape))
    return normalizers


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted longest first, in chunks of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--val-examples", type=Path, help="optional: featurized after the timed pass (untimed, no Adam) into val_features")
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--target", choices=["global", "per_module"], default="global")
    parser.add_argument("--projection", choices=["rademacher", "normal"], default="rademacher")
    parser.add_argument("--loss-reduction", choices=["mean", "sum"], default="mean")
    parser.add_argument("--adam-v", default="none", help="none | synthetic | FILE.safetensors of exp_avg_sq per LoRA weight")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bergson
    from bergson import GradientProcessor, IndexConfig, InMemoryCollector
    from bergson.collector.collector import CollectorComputer
    from datasets import Dataset

    logging.getLogger("CollectorComputer").addFilter(lambda record: record.levelno >= logging.WARNING)  # per-run module lists

    def dataset(path: Path) -> tuple[list[dict], Dataset, list[list[int]]]:
        rows = json.loads(path.read_text())
        data = Dataset.from_dict({"input_ids": [e["input_ids"] for e in rows], "labels": [e["labels"] for e in rows]})
        return rows, data, length_batches([len(e["input_ids"]) for e in rows], args.batch_size)

    examples, data, batches = dataset(args.examples)

    model, target_modules = load_model(args.model, args.adapter, args.device)
    modules = len(target_modules)
    if args.target == "global":
        projection_dim, feature_dim = args.proj_dim, args.proj_dim
    else:
        projection_dim = max(1, round(math.sqrt(args.proj_dim / modules)))
        feature_dim = modules * projection_dim**2

    with tempfile.TemporaryDirectory() as tmp:  # CollectorComputer saves a token count under the run path
        cfg = IndexConfig(
            run_path=str(Path(tmp) / "run"),
            projection_dim=projection_dim,
            projection_type=args.projection,
            projection_target=args.target,
            loss_reduction=args.loss_reduction,
        )
        cfg.partial_run_path.mkdir(parents=True)

        def make_processor(normalizers: dict):
            return GradientProcessor(
                normalizers, projection_dim=projection_dim, projection_type=args.projection, projection_target=args.target
            )

        processor = make_processor(adam_normalizers(model, target_modules, args.adam_v))

        def collect(batch_list, data=data, processor=processor):
            collector = InMemoryCollector(model=model.base_model, cfg=cfg, processor=processor, target_modules=target_modules, data=data)
            computer = CollectorComputer(model=model, data=data, collector=collector, batches=batch_list, cfg=cfg)
            computer.run_with_collector_hooks(desc="bergson")
            return collector

        collect(batches[:1])  # warm-up: caches per-module projection matrices (global ones are never cached)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        collector = collect(batches)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = {}
        if args.val_examples is not None:  # untimed; the projection matrices depend only on module names and seed
            val_rows, val_data, val_batches = dataset(args.val_examples)
            val = collect(val_batches, val_data, make_processor({}))
            extra["val_features"] = torch.cat([val.gradients[name].float() for name in val.shapes()], dim=1).numpy().astype(np.float32)
            assert extra["val_features"].shape == (len(val_rows), feature_dim), (extra["val_features"].shape, feature_dim)

    features = torch.cat([collector.gradients[name].float() for name in collector.shapes()], dim=1).numpy()
    assert features.shape == (len(examples), feature_dim), (features.shape, feature_dim)
    losses = collector.per_doc_losses.float().cpu().numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        features=features.astype(np.float32),
        seconds=np.float64(seconds),
        samples=np.int64(len(examples)),
        losses=losses,
        threads=np.int64(args.threads),
        batch_size=np.int64(args.batch_size),
        target=args.target,
        projection=args.projection,
        projection_dim=np.int64(projection_dim),
        modules=np.int64(modules),
        adam=args.adam_v if args.adam_v in ("none", "synthetic") else "file",
        bergson_version=bergson.__version__,
        **extra,
    )
    print(
        f"bergson {bergson.__version__} {args.target} d={feature_dim} ({modules} LoRA modules) adam={args.adam_v if args.adam_v in ('none', 'synthetic') else 'v from file'}: "
        f"{len(examples)} samples in {seconds:.2f}s = {len(examples) / seconds:.2f} samples/s "
        f"(batch {args.batch_size}, {args.threads} threads, {args.device})"
    )


if __name__ == "__main__":
    main()
