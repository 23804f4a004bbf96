"""Checks benchmarks/bergson_row.py's features against exact per-sample LoRA gradients (bergson's venv; small LoRAs).

    python benchmarks/_bergson_check.py --adapter DIR --examples FILE.json --optimizer-state optimizer.pt --out-dir DIR

Reads every ``TARGET_BATCHING.npz`` bergson_row.py wrote to ``--out-dir``. Exact gradients: plain torch, batch 1,
``loss.backward()`` on each example's mean token loss, LoRA weights only, in bergson's module order; with an
optimizer state, each divided by sqrt(v) + 1e-8, v the ``exp_avg_sq`` of that weight in the ``optimizer.pt`` as
torch wrote it (state i is the i-th trainable parameter: read here independently of bergson's
``load_from_optimizer``, so a module mismatch in bergson's loading would show). Per file:
  cosine  min cosine between bergson's rows and those exact gradients put through bergson's own projection
          matrices (``project_global`` with the collector's identifiers / the per-module left and right
          matrices): 1 means bergson's hooks, loss, batching and normaliser give exactly that;
  loss    largest |bergson's per-example loss - the exact mean token loss|.
The last line is one JSON object: ``{"TARGET/BATCHING": {"cosine_min": x, "loss_max_diff": y}}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def exact_gradients(adapter_dir: str, examples: list[dict], optimizer_state: str):
    """Per-example LoRA weight gradients [N, O, I] per bergson module name (bergson's order), the losses, and
    each module's sqrt(v) + 1e-8 (None without an optimizer state)."""
    from bergson.utils.worker_utils import extract_peft_target_modules
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True, autocast_adapter_dtype=False)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    targets = extract_peft_target_modules(model)
    names = [name for name, _ in model.base_model.named_modules() if name in targets]
    params = {name: model.base_model.get_submodule(name).weight for name in names}
    denominators = None
    if optimizer_state != "none":
        state = torch.load(optimizer_state, map_location="cpu", weights_only=False)["state"]
        by_param = {id(p): state[i]["exp_avg_sq"] for i, (_, p) in enumerate(trainable)}
        denominators = {name: by_param[id(params[name])].sqrt() + 1e-8 for name in names}
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    grads = {name: [] for name in names}
    losses = []
    for example in examples:
        logits = model(torch.tensor([example["input_ids"]])).logits[:, :-1]
        labels = torch.tensor([example["labels"]])[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        for name in names:
            grads[name].append(params[name].grad.detach().clone())
    grads = {name: torch.stack(g) for name, g in grads.items()}
    if denominators is not None:
        grads = {name: g / denominators[name] for name, g in grads.items()}
    return names, grads, np.array(losses)


def expected_features(names, grads, target: str, p: int, projection: str) -> torch.Tensor:
    """The exact gradients through bergson's own projection matrices (the collector's identifiers, seed None)."""
    from bergson.collector.collector import HookCollectorBase, create_module_projection_matrix, project_global

    if target == "global":
        return sum(
            project_global(HookCollectorBase.projection_identifier(name, "single", None), grads[name].flatten(1), p, projection, "jl")
            for name in names
        )
    parts = []
    for name in names:
        G = grads[name]
        left = create_module_projection_matrix(name, "left", p, G.shape[1], torch.float32, torch.device("cpu"), projection, "jl", None)
        right = create_module_projection_matrix(name, "right", p, G.shape[2], torch.float32, torch.device("cpu"), projection, "jl", None)
        parts.append((left @ G @ right.T).flatten(1))
    return torch.cat(parts, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--optimizer-state", default="none")
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    examples = json.loads(args.examples.read_text())
    names, grads, losses = exact_gradients(args.adapter, examples, args.optimizer_state)
    runs = sorted(args.out_dir.glob("*.npz"))
    if not runs:
        raise SystemExit(f"no .npz in {args.out_dir}")
    expected_by: dict[tuple[str, int], torch.Tensor] = {}
    checked = {}
    for path in runs:
        run = np.load(path)
        target, p, projection = str(run["target"]), int(run["projection_dim"]), str(run["projection"])
        if (run["adam"] == "none") != (args.optimizer_state == "none"):
            raise SystemExit(f"{path}: ran with adam={run['adam']}, checked with --optimizer-state {args.optimizer_state}")
        if (target, p) not in expected_by:
            expected_by[target, p] = expected_features(names, grads, target, p, projection).double()
        cosine = F.cosine_similarity(torch.from_numpy(run["features"]).double(), expected_by[target, p], dim=1)
        name = f"{target}/{'tokens' if str(run['batching']) == 'tokens' else 'b' + str(run['batching'])}"
        checked[name] = {"cosine_min": float(cosine.min()), "loss_max_diff": float(np.abs(run["losses"] - losses).max())}
        print(f"{name}: exact cosine min {checked[name]['cosine_min']:.6f} | loss max diff {checked[name]['loss_max_diff']:.2e}")
    print(json.dumps(checked))


if __name__ == "__main__":
    main()
