"""LoRA adapters and their AdamW state, saved keyed by parameter name (never by index)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clusterucb.features.gradients import AdamState, lora_parameter_names
from clusterucb.infra.io import atomic_dir, save_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    r: int = 128
    alpha: int = 512
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = ("q_proj", "k_proj", "v_proj", "o_proj")  # None: detect
    seed: int = 0  # initialisation of the A matrices

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        d = dict(d)
        targets = d.get("target_modules", cls.target_modules)
        d["target_modules"] = tuple(targets) if targets else None
        return cls(**d)


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 style linear layer


def attention_targets(model) -> list[str]:
    """LoRA targets for every linear projection inside the attention blocks (q, k, v, o; fused qkv too).

    A leaf name also used outside attention (GPT-2's ``c_proj``) is qualified by its
    parent (``attn.c_proj``) so that peft's suffix matching stays inside attention.
    """
    attention, elsewhere = set(), set()
    for name, module in model.named_modules():
        if not _is_linear(module) or "." not in name:
            continue
        parts = name.split(".")
        if any("attn" in p.lower() or "attention" in p.lower() for p in parts[:-1]):
            attention.add((parts[-2], parts[-1]))
        else:
            elsewhere.add(parts[-1])
    targets = sorted({leaf if leaf not in elsewhere else f"{parent}.{leaf}" for parent, leaf in attention})
    if not targets:
        raise ValueError(f"no linear layer inside an attention block of {type(model).__name__}; set lora.target_modules")
    return targets


def attach_lora(model, spec: LoraSpec):
    """A fresh, trainable LoRA adapter on ``model`` (seeded init); targets detected when not given."""
    from peft import LoraConfig, get_peft_model

    targets = list(spec.target_modules) if spec.target_modules else attention_targets(model)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    torch.manual_seed(spec.seed)
    return get_peft_model(model, config)


def load_lora(model, adapter_dir: str | Path, trainable: bool, device=None):
    """Base model + saved adapter; trainable adapters keep requires_grad on LoRA weights only.

    The adapter's weights are read onto ``device`` (default: where the base model's weights are), never
    onto peft's default ``cuda`` (the current GPU), so a job that claimed ``cuda:2`` opens nothing on
    ``cuda:0``. Move the base model to the job's device first.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (adapter_dir / name).exists():
            raise FileNotFoundError(f"missing LoRA checkpoint file {adapter_dir / name}")
    if device is None:
        device = next(model.parameters()).device
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable, torch_device=str(torch.device(device)))
    if trainable:
        for name, param in peft_model.named_parameters():
            param.requires_grad_("lora_" in name)
    return peft_model


def save_adapter(peft_model, adapter_dir: str | Path) -> None:
    """peft's ``save_pretrained`` layout, written atomically (weights file last)."""
    with atomic_dir(adapter_dir, last=ADAPTER_WEIGHTS) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        readme = tmp / "README.md"
        if readme.exists():
            readme.unlink()


@dataclass
class OptimizerCheckpoint:
    """AdamW moments keyed by parameter name, plus what is needed to resume the schedule."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    hyper: dict = field(default_factory=dict)  # betas, eps, lr, weight_decay, global_step, ...


def optimizer_checkpoint(peft_model, optimizer: torch.optim.Optimizer, extra: dict) -> OptimizerCheckpoint:
    names = {id(p): n for n, p in peft_model.named_parameters() if p.requires_grad}
    group = optimizer.param_groups[0]
    ckpt = OptimizerCheckpoint(
        {}, {}, {}, {"betas": list(group["betas"]), "eps": group["eps"], "weight_decay": group["weight_decay"], **extra}
    )
    for param, state in optimizer.state.items():
        name = names[id(param)]
        ckpt.exp_avg[name] = state["exp_avg"].detach().float().cpu()
        ckpt.exp_avg_sq[name] = state["exp_avg_sq"].detach().float().cpu()
        ckpt.step[name] = float(state["step"])
    return ckpt


def save_optimizer_state(ckpt: OptimizerCheckpoint, path: str | Path, metadata: dict) -> None:
    tensors = {}
    for name in ckpt.exp_avg:
        tensors[f"{name}::exp_avg"] = ckpt.exp_avg[name]
        tensors[f"{name}::exp_avg_sq"] = ckpt.exp_avg_sq[name]
    meta = {**metadata, "hyper": json.dumps(ckpt.hyper), "step": json.dumps(ckpt.step)}
    save_safetensors(tensors, path, meta)


def load_optimizer_state(path: str | Path) -> OptimizerCheckpoint:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing optimizer state {path}")
    ckpt = OptimizerCheckpoint({}, {}, {})
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if "hyper" not in meta or "step" not in meta:
            raise ValueError(f"{path}: not an optimizer state written by clusterucb (no hyper/step metadata)")
        ckpt.hyper = json.loads(meta["hyper"])
        ckpt.step = json.loads(meta["step"])
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict: it has no __contains__/__iter__)
            name, _, kind = key.rpartition("::")
            target = ckpt.exp_avg if kind == "exp_avg" else ckpt.exp_avg_sq
            target[name] = handle.get_tensor(key)
    return ckpt


def restore_optimizer(peft_model, optimizer: torch.optim.Optimizer, ckpt: OptimizerCheckpoint) -> None:
    """Put saved moments back into a fresh AdamW over the same named parameters."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(ckpt.exp_avg))
    if missing:
        raise KeyError(f"optimizer state lacks parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for name, param in params.items():
        optimizer.state[param] = {
            "step": torch.tensor(ckpt.step[name]),
            "exp_avg": ckpt.exp_avg[name].to(param.device, param.dtype).clone(),
            "exp_avg_sq": ckpt.exp_avg_sq[name].to(param.device, param.dtype).clone(),
        }


def adam_state_for(peft_model, ckpt: OptimizerCheckpoint) -> AdamState:
    """Flatten the moments in gradient (``named_parameters``) order, with the saved betas and eps."""
    names = lora_parameter_names(peft_model)
    missing = [n for n in names if n not in ckpt.exp_avg]
    if missing:
        raise KeyError(f"optimizer state lacks parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    beta1, beta2 = ckpt.hyper["betas"]
    return AdamState(
        exp_avg=torch.cat([ckpt.exp_avg[n].flatten() for n in names]),
        exp_avg_sq=torch.cat([ckpt.exp_avg_sq[n].flatten() for n in names]),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(ckpt.hyper["eps"]),
    )
