"""LoRA training: warmup steps on the pool, one epoch per selection, resumable within a job.

The loss of an optimizer step is the mean, over the examples of the step, of
each example's mean token loss: what the official per-device batch 1 with
gradient accumulation computes. The learning rate follows HF's linear schedule
with warmup over the whole planned run, so epoch e resumes at global step
(e - 1) * steps_per_epoch and the schedule continues across jobs.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clusterucb.gradients import pad_batch, token_losses
from clusterucb.io import atomic_path, config_hash
from clusterucb.logsetup import progress
from clusterucb.lora import OptimizerCheckpoint, load_optimizer_state, optimizer_checkpoint, restore_optimizer, save_optimizer_state
from clusterucb.schedule import StepPlan, linear_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    effective_batch: int = 128
    micro_batch: int = 8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> TrainSpec:
        """From the config's ``train`` section; run-level keys (``epochs``) are not part of a step's spec."""
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def per_example_losses(model, examples: list[dict], pad_id: int, device) -> torch.Tensor:
    input_ids, attention_mask, labels = pad_batch(examples, pad_id, device)
    token_loss, n_target = token_losses(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    if (n_target == 0).any():
        raise ValueError("an example without target tokens reached training (tokenization should have dropped it)")
    return token_loss.sum(1) / n_target


def capture_rng_state() -> dict:
    """Every generator a training step may draw from (dropout on CPU or CUDA; Python's and NumPy's global
    ones, which we do not use but a library might), JSON-able."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("this training state was saved on a GPU: resume it on one")
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class _Scratch:
    """Resumable in-job state (adapter weights, optimizer, step) outside the declared outputs."""

    def __init__(self, directory: str | Path | None, key: str):
        self.dir = Path(directory) if directory else None
        self.key = key

    def load(self, peft_model, optimizer) -> tuple[int, list[dict]]:
        """Restore weights, optimizer, every RNG and the step records; ``(steps done, their records)``."""
        if self.dir is None or not (self.dir / "state.json").exists():
            return 0, []
        state = json.loads((self.dir / "state.json").read_text())
        if state.get("key") != self.key:
            log.info("ignoring scratch state in %s: it belongs to another configuration", self.dir)
            return 0, []
        from safetensors.torch import load_file

        weights = load_file(str(self.dir / "weights.safetensors"))
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        restore_optimizer(peft_model, optimizer, load_optimizer_state(self.dir / "optimizer.safetensors"))
        restore_rng_state(state["rng"])
        log.info("resuming from scratch state in %s after %d steps", self.dir, state["done"])
        return int(state["done"]), list(state["steps"])

    def save(self, peft_model, optimizer, done: int, steps: list[dict]) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().cpu().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
        with atomic_path(self.dir / "weights.safetensors") as tmp:
            save_file(weights, str(tmp))
        save_optimizer_state(optimizer_checkpoint(peft_model, optimizer, {}), self.dir / "optimizer.safetensors", {})
        state = {"key": self.key, "done": done, "steps": steps, "rng": capture_rng_state()}
        with atomic_path(self.dir / "state.json") as tmp:
            tmp.write_text(json.dumps(state))

    def clear(self) -> None:
        if self.dir is not None and self.dir.exists():
            for path in self.dir.iterdir():
                path.unlink()
            self.dir.rmdir()


def train_lora(
    peft_model,
    examples: list[dict],
    spec: TrainSpec,
    plan: StepPlan,
    pad_id: int,
    data_seed: list[int],
    resume_from: OptimizerCheckpoint | None = None,
    device="cpu",
    scratch_dir: str | Path | None = None,
    save_every: int = 50,
) -> tuple[OptimizerCheckpoint, list[dict]]:
    """Take ``plan.n_steps`` optimizer steps on ``examples`` (shuffled with ``data_seed``, cycling if needed).

    Returns the optimizer state (keyed by parameter name) and one record per
    step of the plan (``global_step``, ``lr``, ``loss``), those before a resume included.
    """
    device = torch.device(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if resume_from is not None:
        restore_optimizer(peft_model, optimizer, resume_from)
    torch.manual_seed(int(np.random.default_rng(data_seed).integers(2**31)))  # dropout
    scratch = _Scratch(scratch_dir, config_hash([asdict(spec), asdict(plan), data_seed, len(examples)]))
    done, steps = scratch.load(peft_model, optimizer)

    needed = plan.n_steps * spec.effective_batch
    rng = np.random.default_rng(data_seed)
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(math.ceil(needed / len(examples)))])
    peft_model.train()
    for local_step in progress(range(done, plan.n_steps), desc="train", total=plan.n_steps - done):
        global_step = plan.start_step + local_step
        lr = spec.lr * linear_schedule(global_step, plan.total_steps, plan.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order[local_step * spec.effective_batch : (local_step + 1) * spec.effective_batch]
        step_loss = 0.0
        for start in range(0, len(batch), spec.micro_batch):
            micro = [examples[i] for i in batch[start : start + spec.micro_batch]]
            loss = per_example_losses(peft_model, micro, pad_id, device).sum() / spec.effective_batch
            loss.backward()
            step_loss += loss.item()
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"global_step": global_step + 1, "lr": lr, "loss": step_loss})
        if local_step % 10 == 0 or local_step == plan.n_steps - 1:
            log.info("step %d (global %d/%d) lr %.3g loss %.4f", local_step + 1, global_step + 1, plan.total_steps, lr, step_loss)
        if save_every and (local_step + 1) % save_every == 0 and local_step + 1 < plan.n_steps:
            scratch.save(peft_model, optimizer, local_step + 1, steps)
    peft_model.eval()
    end_step = plan.start_step + plan.n_steps
    ckpt = optimizer_checkpoint(peft_model, optimizer, {"lr": spec.lr, "global_step": end_step, "total_steps": plan.total_steps})
    scratch.clear()
    return ckpt, steps
