"""Stages: warmup LoRA on the pool, and LoRA training for one epoch on a selection."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clusterucb.infra.devices import base_dtype, device
from clusterucb.infra.io import write_parquet
from clusterucb.models.lora import LoraSpec, attach_lora, load_lora, load_optimizer_state, save_adapter, save_optimizer_state
from clusterucb.models.modeling import enable_gradient_checkpointing, load_base_model
from clusterucb.pipeline.data import read_tokens
from clusterucb.pipeline.files import Checkpoint, TrainingOutputs
from clusterucb.selection.select import n_selected
from clusterucb.training.schedule import plan_steps, steps_per_epoch
from clusterucb.training.trainer import TrainSpec, train_lora

log = logging.getLogger(__name__)


def load_base_model_for_training(model_dir: str, train: dict):
    """The base model in ``train['base_dtype']`` (LoRA and AdamW stay float32), checkpointed if asked."""
    model, tokenizer = load_base_model(model_dir, base_dtype(train.get("base_dtype", "float32")))
    if train.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    return model, tokenizer


def _write_log(steps: list[dict], out: str, meta: dict) -> None:
    """Per-step training log (the steps before a resume from scratch state included)."""
    schema = pa.schema(
        [pa.field("epoch", pa.int32()), pa.field("global_step", pa.int32()), pa.field("lr", pa.float64()), pa.field("loss", pa.float32())]
    )
    write_parquet(pa.Table.from_pylist(steps, schema=schema), out, meta)


def warmup(
    *,
    model_dir: str,
    pool_tokens: str,
    adapter_dir: str,
    optimizer_out: str,
    log_out: str,
    lora: dict,
    train: dict,
    steps: int,
    epochs: int,
    seed: int,
    scratch: str,
) -> None:
    """``steps`` optimizer steps of LoRA training on the shuffled pool (spec §2.3, the 20-step warmup).

    The LR schedule is the one of ``epochs`` epochs over the whole pool, as in
    the official run, so the warmup sees only the start of the LR ramp.
    """
    examples = read_tokens(pool_tokens)
    dev = device()
    model, tokenizer = load_base_model_for_training(model_dir, train)
    peft_model = attach_lora(model.to(dev), LoraSpec.from_dict({**lora, "seed": seed}))
    spec = TrainSpec.from_dict({**train, "seed": seed})
    total = epochs * steps_per_epoch(len(examples), spec.effective_batch)
    plan = plan_steps(0, steps, total, spec.warmup_ratio)
    log.info("warmup: %d steps of %d planned (LR warmup %d) on %d pool examples", steps, total, plan.warmup_steps, len(examples))
    ckpt, records = train_lora(peft_model, examples, spec, plan, tokenizer.pad_token_id, [seed, 0], device=dev, scratch_dir=scratch)
    meta = {"model": model_dir, "checkpoint": "warmup", "global_step": steps}
    save_optimizer_state(ckpt, optimizer_out, meta)
    _write_log([{**r, "epoch": 0} for r in records], log_out, meta)
    save_adapter(peft_model, adapter_dir)
    log.info("warmup done: loss %.4f -> %.4f", records[0]["loss"], records[-1]["loss"])


def less_warmup(
    *,
    model_dir: str,
    pool_tokens: str,
    adapter_dirs: list[str],
    optimizer_outs: list[str],
    log_out: str,
    lora: dict,
    train: dict,
    less: dict,
    seed: int,
    scratch: str,
) -> None:
    """LESS's warmup (spec §2.2): LoRA on a random ``warmup_fraction`` of the pool for
    ``warmup_epochs`` epochs, one checkpoint (adapter + AdamW state) per epoch."""
    pool = read_tokens(pool_tokens)
    n = max(1, int(less["warmup_fraction"] * len(pool)))
    subset = np.random.default_rng([seed, 1]).permutation(len(pool))[:n]
    examples = pool.take(sorted(subset))
    dev = device()
    model, tokenizer = load_base_model_for_training(model_dir, train)
    peft_model = attach_lora(model.to(dev), LoraSpec.from_dict({**lora, "seed": seed}))
    spec = TrainSpec.from_dict({**train, "seed": seed})
    epochs = int(less["warmup_epochs"])
    per_epoch = steps_per_epoch(len(examples), spec.effective_batch)
    log.info("LESS warmup: %d epochs x %d steps on %d random pool examples", epochs, per_epoch, len(examples))
    ckpt, records = None, []
    for epoch in range(1, epochs + 1):
        plan = plan_steps((epoch - 1) * per_epoch, per_epoch, epochs * per_epoch, spec.warmup_ratio)
        ckpt, steps = train_lora(
            peft_model,
            examples,
            spec,
            plan,
            tokenizer.pad_token_id,
            [seed, 1, epoch],
            resume_from=ckpt,
            device=dev,
            scratch_dir=f"{scratch}/epoch-{epoch}",
        )
        records += [{**r, "epoch": epoch} for r in steps]
        save_optimizer_state(ckpt, optimizer_outs[epoch - 1], {"model": model_dir, "checkpoint": f"less/ckpt-{epoch}", "epoch": epoch})
        save_adapter(peft_model, adapter_dirs[epoch - 1])
    # The schedule itself, from which select_less computes the checkpoint weights.
    schedule = {"lr": spec.lr, "steps_per_epoch": per_epoch, "warmup_ratio": spec.warmup_ratio}
    _write_log(records, log_out, {"model": model_dir, "examples": len(examples), "epochs": epochs, "schedule": schedule})


def train_epoch(
    *,
    model_dir: str,
    pool_tokens: str,
    selection: str,
    previous: Checkpoint | None,
    out: TrainingOutputs,
    lora: dict,
    train: dict,
    epoch: int,
    top_p: float,
    seed: int,
    lora_init_seed: int,
    scratch: str,
) -> None:
    """One epoch on the epoch's selection; epoch 1 starts a fresh LoRA on the base model, later epochs resume
    the ``previous`` epoch's adapter and AdamW state and continue the LR schedule of ``train['epochs']``.

    ``seed`` (the run's training seed) orders the data and keys dropout; ``lora_init_seed`` draws the fresh
    LoRA's A matrices and is the warmup's: LoRA gradients at two checkpoints are in comparable coordinates
    only if both adapters started from the same A (the gradient of B is taken through A), and the prior
    methods score warmup features against gradients at this run's checkpoints."""
    epochs = int(train["epochs"])
    pool = read_tokens(pool_tokens)  # memory-mapped: only the selected rows are read
    selected_ids = pq.read_table(selection, columns=["example_id"]).column("example_id").to_pylist()
    rows = pool.indices_of(selected_ids)
    if (rows < 0).any():
        missing = [selected_ids[i] for i in np.flatnonzero(rows < 0)]
        raise KeyError(f"{selection}: {len(missing)} selected ids are not in {pool_tokens} (first: {missing[0]})")
    examples = pool.take(rows)
    dev = device()
    model, tokenizer = load_base_model_for_training(model_dir, train)
    model = model.to(dev)
    spec = TrainSpec.from_dict({**train, "seed": seed})
    # Steps per epoch come from the nominal selection size, so every epoch (and
    # every method) follows the same schedule even if a selection came up short.
    per_epoch = steps_per_epoch(n_selected(len(pool), top_p), spec.effective_batch)
    plan = plan_steps((epoch - 1) * per_epoch, per_epoch, epochs * per_epoch, spec.warmup_ratio)
    if epoch == 1:
        peft_model = attach_lora(model, LoraSpec.from_dict({**lora, "seed": lora_init_seed}))
        resume = None
    else:
        peft_model = load_lora(model, previous.adapter_dir, trainable=True, device=dev)
        resume = load_optimizer_state(previous.optimizer)
        if int(resume.hyper.get("global_step", -1)) != plan.start_step:
            raise ValueError(
                f"{previous.optimizer} ends at global step {resume.hyper.get('global_step')}, epoch {epoch} starts at {plan.start_step}"
            )
    log.info(
        "epoch %d/%d: %d examples, steps %d-%d of %d",
        epoch,
        epochs,
        len(examples),
        plan.start_step + 1,
        plan.start_step + per_epoch,
        plan.total_steps,
    )
    ckpt, records = train_lora(
        peft_model, examples, spec, plan, tokenizer.pad_token_id, [seed, epoch], resume_from=resume, device=dev, scratch_dir=scratch
    )
    meta = {"model": model_dir, "checkpoint": out.adapter_dir, "epoch": epoch, "selection": selection}
    save_optimizer_state(ckpt, out.optimizer, meta)
    _write_log([{**r, "epoch": epoch} for r in records], out.log, meta)
    save_adapter(peft_model, out.adapter_dir)
    log.info("epoch %d done: mean loss %.4f", epoch, sum(r["loss"] for r in records) / max(1, len(records)))
