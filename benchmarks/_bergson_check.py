"""Checks benchmarks/bergson_row.py's features against exact per-sample LoRA gradients (bergson's venv; small models only).

    python benchmarks/_bergson_check.py --model DIR --adapter DIR --examples FILE.json --npz OUT.npz [--npz OUT2.npz ...]

Exact gradients: plain torch, batch 1, ``loss.backward()`` on each example's mean token loss, LoRA weights only,
in bergson's module order (and divided by sqrt(v) + 1e-8 when the row ran with ``--adam-v synthetic``).
Per npz file:
  exact     cosine between bergson's rows and those exact gradients put through the same bergson projection
            matrices (``project_global`` / the per-module left and right matrices): 1 means bergson's hooks,
            loss and batching give the exact per-sample gradients;
  loss      largest |bergson's per-example loss - the exact mean token loss|;
  JL        how well the projection keeps the exact unprojected geometry: Spearman of the pairwise inner
            products (i < j), and Spearman / top-25 % overlap of scores (mean cosine with the last --val
            examples as "validation" gradients) of the other examples. A last line gives the same numbers for a
            fresh dense Rademacher projection (torch, seed 0) of the exact gradients at each d, for reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr


def exact_gradients(model_dir: str, adapter_dir: str, examples: list[dict]) -> tuple[list[str], dict[str, torch.Tensor], np.ndarray]:
    """Per-example LoRA weight gradients [N, O, I] per bergson module name, in bergson's order, and the losses."""
    from bergson.utils.worker_utils import extract_peft_target_modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, autocast_adapter_dtype=False)
    targets = extract_peft_target_modules(model)
    names = [name for name, _ in model.base_model.named_modules() if name in targets]
    params = {name: model.base_model.get_submodule(name).weight for name in names}
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    grads = {name: [] for name in names}
    losses = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        for name in names:
            grads[name].append(params[name].grad.detach().clone())
    return names, {name: torch.stack(g) for name, g in grads.items()}, np.array(losses)


def synthetic_v(row_script: Path, model_dir: str, adapter_dir: str) -> dict[str, torch.Tensor]:
    """The row's ``--adam-v synthetic`` second moments, per module (same generator, same order)."""
    spec = importlib.util.spec_from_file_location("bergson_row", row_script)
    row = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(row)
    model, targets = row.load_model(model_dir, adapter_dir, "cpu")
    return {name: normalizer.weight_avg_sq for name, normalizer in row.adam_normalizers(model, targets, "synthetic").items()}


def expected_features(names, grads, target: str, p: int, projection: str) -> torch.Tensor:
    """The exact gradients through bergson's own projection matrices."""
    from bergson.collector.collector import create_module_projection_matrix, project_global

    if target == "global":
        return sum(project_global(f"{name}/single", grads[name].flatten(1), p, projection, "jl") for name in names)
    parts = []
    for name in names:
        G = grads[name]
        left = create_module_projection_matrix(name, "left", p, G.shape[1], torch.float32, torch.device("cpu"), projection, "jl", None)
        right = create_module_projection_matrix(name, "right", p, G.shape[2], torch.float32, torch.device("cpu"), projection, "jl", None)
        parts.append((left @ G @ right.T).flatten(1))
    return torch.cat(parts, dim=1)


def jl_quality(projected: np.ndarray, exact: np.ndarray, n_val: int) -> dict[str, float]:
    iu = np.triu_indices(len(exact), 1)
    pair = spearmanr((projected @ projected.T)[iu], (exact @ exact.T)[iu]).statistic

    def scores(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (x[:-n_val] @ x[-n_val:].T).mean(1)

    s_proj, s_exact = scores(projected), scores(exact)
    k = max(1, len(s_exact) // 4)
    top = len(set(np.argsort(-s_proj)[:k]) & set(np.argsort(-s_exact)[:k])) / k
    return {"pairwise_spearman": pair, "score_spearman": spearmanr(s_proj, s_exact).statistic, "top25_overlap": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--npz", required=True, type=Path, action="append")
    parser.add_argument("--val", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)

    examples = json.loads(args.examples.read_text())
    names, grads, losses = exact_gradients(args.model, args.adapter, examples)
    print(f"{len(examples)} examples, {len(names)} LoRA modules, {sum(g[0].numel() for g in grads.values())} LoRA weights")
    adam = None
    dims = set()
    for path in args.npz:
        run = np.load(path)
        target, p, projection = str(run["target"]), int(run["projection_dim"]), str(run["projection"])
        g = grads
        if str(run["adam"]) == "synthetic":
            adam = adam or synthetic_v(Path(__file__).with_name("bergson_row.py"), args.model, args.adapter)
            g = {name: grads[name] / (adam[name].sqrt() + 1e-8) for name in names}
        elif str(run["adam"]) != "none":
            raise SystemExit(f"{path}: only adam none / synthetic can be checked")
        features = torch.from_numpy(run["features"]).double()
        dims.add((features.shape[1], str(run["adam"])))
        expected = expected_features(names, g, target, p, projection).double()
        cosine = F.cosine_similarity(features, expected, dim=1)
        flat = torch.cat([g[name].flatten(1) for name in names], dim=1).double().numpy()
        quality = jl_quality(run["features"].astype(np.float64), flat, args.val)
        print(
            f"{path.name}: {target} p={p} d={features.shape[1]} adam={run['adam']} "
            f"{int(run['samples'])} samples in {float(run['seconds']):.2f}s ({int(run['samples']) / float(run['seconds']):.2f}/s, "
            f"batch {int(run['batch_size'])}, {int(run['threads'])} threads) | exact cosine min {cosine.min():.6f} "
            f"| loss max diff {np.abs(run['losses'] - losses).max():.2e} | JL pairwise Spearman {quality['pairwise_spearman']:.4f}, "
            f"score Spearman {quality['score_spearman']:.4f}, top-25% overlap {quality['top25_overlap']:.2f}"
        )
    for d, adam_kind in sorted(dims):
        g = grads if adam_kind == "none" else {name: grads[name] / (adam[name].sqrt() + 1e-8) for name in names}
        flat = torch.cat([g[name].flatten(1) for name in names], dim=1)
        generator = torch.Generator().manual_seed(0)
        projected = torch.zeros(len(flat), d)
        for start in range(0, d, 1024):  # [1024, n] sign blocks, to keep memory small
            block = torch.randint(0, 2, (min(1024, d - start), flat.shape[1]), generator=generator).float() * 2 - 1
            projected[:, start : start + len(block)] = flat @ block.T
        quality = jl_quality(projected.double().numpy(), flat.double().numpy(), args.val)
        print(
            f"reference dense Rademacher d={d} adam={adam_kind}: JL pairwise Spearman {quality['pairwise_spearman']:.4f}, "
            f"score Spearman {quality['score_spearman']:.4f}, top-25% overlap {quality['top25_overlap']:.2f}"
        )


if __name__ == "__main__":
    main()
