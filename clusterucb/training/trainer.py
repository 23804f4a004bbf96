"""LoRA training: warmup steps on the pool, one epoch per selection, resumable within a job.

The loss of an optimizer step is the mean, over the examples of the step, of
each example's mean token loss: what the official per-device batch 1 with
gradient accumulation computes. The learning rate follows HF's linear schedule
with warmup over the whole planned run, so epoch e resumes at global step
(e - 1) * steps_per_epoch and the schedule continues across jobs.

``micro_batch`` is a memory knob only: dropout masks are keyed per example, by
(seed, optimizer step, position in the step) (clusterucb/training/dropout.py), so cutting
a step into other micro-batches changes nothing but float rounding. On a CUDA
out-of-memory error the step is redone from zero gradients with half the
micro-batch (down to 1), after the error's handler has let go of the failed
micro-batch's graph; the effective batch, the masks and the data order stay.
A float16 base is refused: there is no loss scaling, and its activation
gradients underflow (use bfloat16 or float32).
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

from clusterucb.features.gradients import pad_batch, token_losses
from clusterucb.infra.devices import deterministic_algorithms, is_nondeterminism_error, release_memory
from clusterucb.infra.io import atomic_path, config_hash
from clusterucb.infra.logsetup import progress
from clusterucb.models.lora import OptimizerCheckpoint, load_optimizer_state, optimizer_checkpoint, restore_optimizer, save_optimizer_state
from clusterucb.training.dropout import example_keys, install_example_dropout, kernel_dropout, row_keys
from clusterucb.training.schedule import StepPlan, linear_schedule

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

    def result_fields(self) -> dict:
        """Everything a step's result depends on: all fields but ``micro_batch`` (memory only)."""
        return {k: v for k, v in asdict(self).items() if k != "micro_batch"}


def refuse_float16(model) -> None:
    """Training with float16 base weights and no loss scaling: activation gradients below ~6e-8 flush to
    zero on their way back to the LoRA factors (the per-sample gradient pass has the same problem)."""
    half = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.dtype == torch.float16})
    if half:
        raise ValueError(
            f"float16 weights ({half[0]}{' ...' if len(half) > 1 else ''}): training has no loss scaling, so float16 "
            "gradients underflow; load the base model in bfloat16 (precision.base_dtype) or float32"
        )


def per_example_losses(model, examples: list[dict], pad_id: int, device) -> torch.Tensor:
    input_ids, attention_mask, labels = pad_batch(examples, pad_id, device)
    token_loss, n_target = token_losses(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    if (n_target == 0).any():
        raise ValueError("an example without target tokens reached training (tokenization should have dropped it)")
    return token_loss.sum(1) / n_target


def capture_rng_state() -> dict:
    """The generators a library might draw from during training, JSON-able: torch's CPU one, the *current*
    CUDA device's (the one this job claimed; never every visible GPU's), Python's and NumPy's. Dropout draws
    from none of them (its masks are keyed per example), so a resume on another GPU, or on fewer visible
    GPUs, restores what matters."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda_current"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda_current" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(state["cuda_current"], dtype=torch.uint8))
        else:
            log.info("the scratch state holds a CUDA generator and no GPU is visible: not restored (dropout does not use it)")


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


def adapter_fingerprint(peft_model) -> list:
    """Name, shape and two sums of every trainable tensor: what the adapter starts from, cheaply."""
    with torch.no_grad():
        return [
            [name, list(p.shape), float(p.double().sum()), float(p.double().abs().sum())]
            for name, p in peft_model.named_parameters()
            if p.requires_grad
        ]


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
    refuse_float16(peft_model)
    install_example_dropout(peft_model)
    in_kernels = kernel_dropout(peft_model)
    if in_kernels:
        log.warning(
            "attention dropout %s acts inside the attention kernel and is not keyed per example: with it, "
            "train.micro_batch and the device change the masks",
            in_kernels,
        )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if resume_from is not None:
        restore_optimizer(peft_model, optimizer, resume_from)
    dropout_seed = int(np.random.default_rng(data_seed).integers(2**31))
    torch.manual_seed(dropout_seed)  # for anything else that draws from torch's generator; dropout does not
    # The key names the starting adapter too: a scratch state left by a job that started from other weights
    # (another LoRA initialisation or rank, another previous epoch) is not resumed.
    scratch = _Scratch(
        scratch_dir, config_hash([spec.result_fields(), asdict(plan), data_seed, len(examples), adapter_fingerprint(peft_model)])
    )
    done, steps = scratch.load(peft_model, optimizer)

    needed = plan.n_steps * spec.effective_batch
    rng = np.random.default_rng(data_seed)
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(math.ceil(needed / len(examples)))])
    runner = _StepRunner(peft_model, examples, spec, pad_id, device, dropout_seed)
    peft_model.train()
    try:
        for local_step in progress(range(done, plan.n_steps), desc="train", total=plan.n_steps - done):
            global_step = plan.start_step + local_step
            lr = spec.lr * linear_schedule(global_step, plan.total_steps, plan.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = order[local_step * spec.effective_batch : (local_step + 1) * spec.effective_batch]
            step_loss = runner.gradients(batch, global_step, optimizer)
            if spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append({"global_step": global_step + 1, "lr": lr, "loss": step_loss})
            if local_step % 10 == 0 or local_step == plan.n_steps - 1:
                log.info("step %d (global %d/%d) lr %.3g loss %.4f", local_step + 1, global_step + 1, plan.total_steps, lr, step_loss)
            if save_every and (local_step + 1) % save_every == 0 and local_step + 1 < plan.n_steps:
                scratch.save(peft_model, optimizer, local_step + 1, steps)
    finally:
        peft_model.eval()
    end_step = plan.start_step + plan.n_steps
    ckpt = optimizer_checkpoint(peft_model, optimizer, {"lr": spec.lr, "global_step": end_step, "total_steps": plan.total_steps})
    scratch.clear()
    return ckpt, steps


class _StepRunner:
    """The summed gradient of one optimizer step, accumulated over micro-batches; backs off on CUDA OOM."""

    def __init__(self, model, examples: list[dict], spec: TrainSpec, pad_id: int, device: torch.device, dropout_seed: int):
        self.model, self.examples, self.spec, self.pad_id, self.device = model, examples, spec, pad_id, device
        self.dropout_seed = dropout_seed
        self.micro_batch = spec.micro_batch
        self.strict = True  # deterministic algorithms on CUDA; warn-only after an op without a deterministic kernel

    def _accumulate(self, batch, global_step: int) -> torch.Tensor:
        keys = row_keys(self.dropout_seed, global_step, len(batch))
        total = torch.zeros((), device=self.device)
        with deterministic_algorithms(self.device, self.strict):
            for start in range(0, len(batch), self.micro_batch):
                micro = [self.examples[i] for i in batch[start : start + self.micro_batch]]
                with example_keys(keys[start : start + self.micro_batch]):
                    loss = per_example_losses(self.model, micro, self.pad_id, self.device).sum() / self.spec.effective_batch
                    loss.backward()
                total += loss.detach()
        return total

    def gradients(self, batch, global_step: int, optimizer) -> float:
        """Accumulate the step's gradient into ``.grad``; returns the step's loss (one host sync per step).

        A failed attempt (out of memory, or an op strict deterministic mode refuses) may have added part of
        its backward to ``.grad``: the step is redone from zero gradients, outside the ``except``.
        """
        while True:
            failure = None
            try:
                return float(self._accumulate(batch, global_step))
            except torch.OutOfMemoryError as error:
                failure = ("oom", str(error).splitlines()[0] if str(error) else "out of memory")
            except RuntimeError as error:
                if not is_nondeterminism_error(error):
                    raise
                failure = ("nondeterministic", str(error).splitlines()[0])
            optimizer.zero_grad(set_to_none=True)
            release_memory(self.device)
            if failure[0] == "nondeterministic":
                log.warning(
                    "%s; going on with warn-only deterministic mode: this job's training is not bit-repeatable on this GPU", failure[1]
                )
                self.strict = False
            elif self.micro_batch == 1:
                raise torch.OutOfMemoryError(f"out of memory at micro-batch 1 (global step {global_step + 1}): {failure[1]}")
            else:
                self.micro_batch = max(1, self.micro_batch // 2)
                log.warning(
                    "out of memory at global step %d; redoing the step with micro-batches of %d (effective batch %d unchanged)",
                    global_step + 1,
                    self.micro_batch,
                    self.spec.effective_batch,
                )
