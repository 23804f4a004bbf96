"""Rows (e) of benchmarks/gradients.py: dattri-llm's optimizer-aware per-sample gradient capture (its LESS path).

Runs in dattri-llm's own virtual environment: it imports neither ``clusterucb`` nor anything from this repository.

    python3 -m venv .venv-dattri && . .venv-dattri/bin/activate
    pip install torch==2.13.0                      # the CPU wheel first (any other torch pulls CUDA)
    pip install "dattri-llm[transformers,attribution]==0.1.0" torch==2.13.0 peft safetensors numpy
    python benchmarks/dattri_row.py --adapter DIR --examples FILE.json --optimizer-state optimizer.pt \
        --configs dense:8,mask:8 --proj-dim 8192 --repeats 3 --threads 2 --out-dir DIR

``--adapter``: a PEFT LoRA adapter directory whose ``adapter_config.json`` names the base model directory;
``--examples`` (and ``--val-examples``): a JSON list of ``{"input_ids": [...], "labels": [...]}`` (labels -100
on prompt tokens, unshifted); ``--optimizer-state``: a ``torch.save``-d AdamW ``state_dict()`` over the LoRA
weights, loaded into a ``torch.optim.AdamW`` over the same weights.

What runs is dattri-llm's advertised capture surface: ``HookManager(model, config=HookManagerConfig(...),
optimizer=adamw)`` and ``with hm.collect():`` around our own loop (forward, each example's mean token loss,
their sum's ``backward()``; no optimizer step), ``hm.get_gradient()`` after each backward. ``linear_io`` hooks
on the LoRA ``lora_A`` / ``lora_B`` linears. With ``optimizer=`` every hooked layer captures the optimizer's
per-sample update direction: dattri_llm/gradient/ops/optimizer.py:189-230 (``precondition``; AdamW:
m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, bias-corrected with step = the state's step + 1,
m_hat / (sqrt(v_hat) + eps): optimizer.py:81-96, optimizer_state.py:494-514) -- LESS's Gamma with eps outside
the square root, where LESS (and ours) put it inside. Its LESSAttributor captures the same way
(attribution/algorithm/less.py:152-176: ``precondition=True``, the checkpoint's optimizer).

Configurations ``STYLE:BATCH``:
  dense  per layer, materialize each per-sample gradient, precondition it, then project it with a
         (D_layer, p) matrix from dattri's ``random_project`` (rademacher; dattri_llm/gradient/hooks/hooks.py:761-773,
         gradient/ops/projection.py:150-200): p = round(proj_dim / layers) per layer, features concatenated,
         so d = layers * p. The matrix is built once per HookManager by projecting the identity and cached,
         keyed by (D_layer, p, seed) -- layers of the same width share one (projection.py:170-181).
  mask   per layer, keep p fixed random coordinates of the per-sample gradient, gathered from the factors
         without materializing, preconditioned on those coordinates (hooks.py:755-760, projection.py:685-764):
         coordinate sampling, not a JL projection.
The optimizer map needs exact entries, so a preconditioned layer is always materialized (``dense``) or
gathered (``mask``), never kept factorized; the ``logra`` (factored) style is refused with an optimizer
(manager.py:174-194), and its FLOP-aware routing (``capture_style="auto"``) only applies to unpreconditioned
captures (hooks.py:775-790).

Timed, per repeat: the capture loop over all examples (one HookManager per configuration; one untimed warm-up
batch first, which builds the projection matrices: its time is saved as ``first_batch_seconds``). Each batch's
wall time and padded token count are saved. ``--out-dir`` gets ``STYLE_BATCH.npz``: ``features`` (N, d) in the
order of the examples, ``seconds`` (R,), ``batch_seconds`` (R, B), ``batch_sizes``, ``batch_tokens``,
``val_features`` (``--val-examples``, with the map switched off: plain gradients, as LESS's queries; untimed)
and, with ``--check``, ``exact_cosine``: the min cosine between the captured features and exact batch-1
gradients put through dattri's own ``precondition`` and the same projection (small LoRAs only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F

LORA_LAYERS = [r"\.lora_[AB]\.default$"]


def load(adapter: str, device: str):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    return PeftModel.from_pretrained(model, adapter, is_trainable=True, autocast_adapter_dtype=False).to(device).eval()


def batches_of(lengths: list[int], size: int) -> list[list[int]]:
    """Longest first, ``size`` at a time (as our featurizer's length batches)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def pad(rows: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return ids.to(device), labels.to(device), mask.to(device)


def example_losses(model, ids, labels, mask) -> torch.Tensor:
    """Each example's mean token cross-entropy over its label tokens (the LESS / our per-sample loss)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none")
    valid = (target != -100).float()
    return (tokens.view_as(valid) * valid).sum(1) / valid.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--val-examples", type=Path)
    parser.add_argument("--optimizer-state", required=True, type=Path)
    parser.add_argument("--configs", default="dense:8,mask:8")
    parser.add_argument("--proj-dim", type=int, default=8192, help="total feature dimension: proj_dim / layers per layer")
    parser.add_argument("--proj-type", default="rademacher", help="dattri's random_project type (CPU: rademacher, normal)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", action="store_true", help="compare with exact batch-1 gradients (small LoRAs)")
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import dattri_llm
    from dattri_llm import HookManager, HookManagerConfig
    from dattri_llm.gradient import ops

    configs = []
    for item in filter(None, (p.strip() for p in args.configs.split(","))):
        style, _, size = item.partition(":")
        if style not in ("dense", "mask") or not size.isdigit():
            raise SystemExit(f"--configs: {item!r} is not dense|mask:N")
        configs.append((style, int(size)))

    device = torch.device(args.device)
    model = load(args.adapter, args.device)
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in lora], lr=1e-4)
    optimizer.load_state_dict(torch.load(args.optimizer_state, map_location=device, weights_only=False))
    layers = sorted({n.removesuffix(".weight") for n, _ in lora}, key=[n.removesuffix(".weight") for n, _ in lora].index)
    per_layer = max(1, round(args.proj_dim / len(layers)))
    examples = json.loads(args.examples.read_text())
    val = json.loads(args.val_examples.read_text()) if args.val_examples else None
    lengths = [len(e["input_ids"]) for e in examples]

    def kwargs(style: str) -> dict:
        if style == "mask":
            return {"style": "mask", "proj_dim": per_layer, "proj_seed": 0}
        return {"style": "dense", "proj_dim": per_layer, "proj_seed": 0, "proj_max_batch_size": 8, "proj_type": args.proj_type}

    def capture(hm, names, rows: list[dict], batches: list[list[int]], stamps: list[float] | None = None) -> torch.Tensor:
        out = None
        for batch in batches:
            ids, labels, mask = pad([rows[i] for i in batch], device)
            example_losses(model, ids, labels, mask).sum().backward()
            grad = hm.get_gradient()
            block = torch.cat([grad.data[name].reshape(len(batch), -1).float() for name in names], dim=1).cpu()
            model.zero_grad(set_to_none=True)
            if out is None:
                out = torch.empty(len(rows), block.shape[1])
            out[batch] = block
            if stamps is not None:
                stamps.append(time.perf_counter())
        return out

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for style, size in configs:
        config = HookManagerConfig(linear_io=LORA_LAYERS, projection_kwargs={"__default__": kwargs(style)})
        hm = HookManager(model, config=config, optimizer=optimizer)
        names = [name for name in layers if name in set(hm.layer_names)]
        assert len(names) == len(layers), (len(names), len(layers))
        batches = batches_of(lengths, size)
        with hm.collect():
            start = time.perf_counter()
            capture(hm, names, examples, batches[:1])  # warm-up: kernels, and the projection matrices are built
            first = time.perf_counter() - start
            seconds, batch_seconds = [], []
            for _ in range(args.repeats):
                stamps: list[float] = []
                start = time.perf_counter()
                features = capture(hm, names, examples, batches, stamps)
                seconds.append(time.perf_counter() - start)
                batch_seconds.append(np.diff([start, *stamps]))
            extra = {}
            if val is not None:
                hm.precondition = False  # plain query gradients, the same projection
                extra["val_features"] = capture(hm, names, val, batches_of([len(e["input_ids"]) for e in val], size)).numpy()
                hm.precondition = True
        if args.check:
            extra["exact_cosine"] = np.float64(check(model, optimizer, hm, names, examples, style, kwargs(style), device, ops))
        hm.remove()
        np.savez(
            args.out_dir / f"{style}_{size}.npz",
            features=features.numpy(),
            seconds=np.array(seconds),
            batch_seconds=np.array(batch_seconds),
            batch_sizes=np.array([len(b) for b in batches]),
            batch_tokens=np.array([len(b) * max(lengths[i] for i in b) for b in batches]),
            first_batch_seconds=np.float64(first),
            samples=np.int64(len(examples)),
            style=style,
            batch_size=np.int64(size),
            per_layer_dim=np.int64(per_layer),
            layers=np.int64(len(layers)),
            threads=np.int64(args.threads),
            dattri_llm_version=dattri_llm.__version__,
            **extra,
        )
        print(
            f"dattri-llm {dattri_llm.__version__} {style} d={features.shape[1]} ({len(layers)} LoRA layers x {per_layer}) "
            f"batch {size}: {len(examples)} samples in min {min(seconds):.2f} s, median {float(np.median(seconds)):.2f} s "
            f"over {len(seconds)} runs (first batch {first:.2f} s; {args.threads} threads)"
            + (f"; exact cosine min {extra['exact_cosine']:.6f}" if "exact_cosine" in extra else ""),
            flush=True,
        )


def check(model, optimizer, hm, names, examples, style, kw, device, ops) -> float:
    """Min cosine of the captured features against exact batch-1 gradients through dattri's own map and projection."""
    from dattri_llm.gradient.optimizer_state import OptimizerSnapshot

    snapshot = OptimizerSnapshot(model, optimizer)
    projector = ops.DattriProjector()
    params = {name: model.get_submodule(name).weight for name in names}
    got, want = [], []
    with hm.collect():
        for example in examples:
            ids, labels, mask = pad([example], device)
            example_losses(model, ids, labels, mask).sum().backward()
            grad = hm.get_gradient()
            got.append(torch.cat([grad.data[n].reshape(1, -1).float() for n in names], dim=1).cpu())
            parts = []
            for name in names:
                g = params[name].grad.detach().reshape(1, -1).float()
                if style == "dense":
                    mapped = snapshot.precondition(name, g)
                    parts.append(ops.apply_projection(projector, mapped, **{k: v for k, v in kw.items() if k != "style"}))
                else:
                    idx = projector.mask_indices(g.shape[1], proj_dim=kw["proj_dim"], proj_seed=kw["proj_seed"], device=g.device)
                    parts.append(snapshot.precondition(name, g[:, idx], idx))
            want.append(torch.cat(parts, dim=1).cpu())
            model.zero_grad(set_to_none=True)
    return float(F.cosine_similarity(torch.cat(got).double(), torch.cat(want).double(), dim=1).min())


if __name__ == "__main__":
    main()
