"""Stages: per-sample gradient features of pool shards and of the validation set, and the manifest."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clusterucb.data.tokens import token_meta
from clusterucb.features.gradients import AdamPreconditioner, GradientFeaturizer, featurize_resumable
from clusterucb.features.gradstore import merge_manifest, write_shard
from clusterucb.features.projection import make_projector
from clusterucb.infra.devices import device
from clusterucb.infra.io import file_sha256
from clusterucb.infra.throughput import THROUGHPUT
from clusterucb.models.lora import ADAPTER_WEIGHTS, adam_state_for, load_optimizer_state
from clusterucb.models.modeling import enable_gradient_checkpointing
from clusterucb.pipeline.data import read_tokens
from clusterucb.pipeline.model import load_checkpoint

log = logging.getLogger(__name__)


# How the work is cut, not what it computes: left out of the resume key, so that a job killed for memory
# resumes with a smaller batch and keeps its finished parts.
THROUGHPUT_FIELDS = THROUGHPUT["gradients"] + THROUGHPUT["precision"]


@dataclass(frozen=True)
class GradParams:
    """Settings of the gradient pass: those that define a feature space (recorded in the shards'
    metadata) and the throughput ones (``THROUGHPUT_FIELDS``)."""

    projector: str = "sjlt"
    proj_dim: int = 8192
    proj_seed: int = 0
    sjlt_c: int = 1
    dtype: str = "float32"
    adam_eps_inside_sqrt: bool = True
    base_dtype: str = "float32"
    max_batch_size: int = 8
    max_batch_tokens: int = 4096
    resume_chunk: int = 512
    gradient_checkpointing: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> GradParams:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def make_featurizer(model_dir: str, adapter_dir: str, optimizer_path: str, checkpoint: str, grad_type: str, params: GradParams):
    """The model with the adapter in ``adapter_dir`` and a featurizer for ``grad_type`` "adam" (pool, preconditioned
    with the AdamW state in ``optimizer_path``) or "sgd" (validation); ``checkpoint`` labels the features."""
    dev = device()  # claim the job's GPU before anything touches CUDA, then load onto it
    peft_model, tokenizer = load_checkpoint(model_dir, adapter_dir, params.base_dtype, dev)
    if params.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    preconditioner = None
    if grad_type == "adam":
        # m and v are loaded once per checkpoint, by parameter name (spec §10.16).
        state = adam_state_for(peft_model, load_optimizer_state(optimizer_path))
        preconditioner = AdamPreconditioner(state, params.adam_eps_inside_sqrt)
    elif grad_type != "sgd":
        raise ValueError(f"unknown gradient type {grad_type!r} (adam or sgd)")
    n_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    projector = make_projector(params.projector, n_params, params.proj_dim, params.proj_seed, params.sjlt_c, device=dev)
    featurizer = GradientFeaturizer(
        peft_model, tokenizer.pad_token_id, projector, preconditioner, dev, params.max_batch_size, params.max_batch_tokens
    )
    meta = {
        "model": model_dir,
        "checkpoint": checkpoint,
        "grad_type": grad_type,
        "projector": params.projector if params.projector != "sjlt" else f"sjlt(c={params.sjlt_c})",
        "proj_dim": params.proj_dim,
        "proj_seed": params.proj_seed,
        "grad_dim": n_params,
        "eps_inside_sqrt": params.adam_eps_inside_sqrt if grad_type == "adam" else "n/a",
        "dtype": params.dtype,
        "base_dtype": params.base_dtype,
    }
    return featurizer, meta


def shard_bounds(n: int, shard: int, n_shards: int) -> tuple[int, int]:
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    return shard * n // n_shards, (shard + 1) * n // n_shards


def grads_pool_shard(
    *,
    model_dir: str,
    adapter_dir: str,
    optimizer_path: str,
    checkpoint: str,
    pool_tokens: str,
    shard: int,
    n_shards: int,
    tensors_out: str,
    index_out: str,
    params: dict,
    scratch: str | None = None,
) -> None:
    """Adam-preconditioned features of the pool rows in ``shard`` (contiguous slice of the tokenized pool).

    Finished chunks of ``resume_chunk`` samples are kept in ``scratch`` (outside the
    declared outputs): a killed job resumes where it stopped.
    """
    grad_params = GradParams.from_dict(params)
    pool = read_tokens(pool_tokens)  # memory-mapped: the job reads its own rows only
    start, stop = shard_bounds(len(pool), shard, n_shards)
    examples = pool[start:stop]
    featurizer, meta = make_featurizer(model_dir, adapter_dir, optimizer_path, checkpoint, "adam", grad_params)
    meta["max_length"] = _max_length(pool_tokens)
    space = {k: v for k, v in asdict(grad_params).items() if k not in THROUGHPUT_FIELDS}
    key = json.dumps([meta, file_sha256(Path(adapter_dir) / ADAPTER_WEIGHTS), space], sort_keys=True)
    result = featurize_resumable(featurizer, examples, scratch, key, grad_params.resume_chunk, desc=f"shard {shard}")
    write_shard(tensors_out, index_out, shard, examples.ids(), result.features, result.losses, result.failures, meta)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("shard %d: %d examples (rows %d-%d), %d failed", shard, len(examples), start, stop, len(result.failures))


def grads_val(
    *, model_dir: str, adapter_dir: str, checkpoint: str, val_tokens: str, tensors_out: str, index_out: str, params: dict
) -> None:
    """Plain (SGD) gradient features of the validation set; any failure is an error."""
    grad_params = GradParams.from_dict(params)
    examples = read_tokens(val_tokens)
    featurizer, meta = make_featurizer(model_dir, adapter_dir, None, checkpoint, "sgd", grad_params)
    meta["max_length"] = _max_length(val_tokens)
    result = featurizer.featurize(examples, desc="validation")
    if result.failures:
        first = next(iter(result.failures.items()))
        raise RuntimeError(f"{len(result.failures)} validation examples failed (e.g. {examples[first[0]]['example_id']}: {first[1]})")
    write_shard(tensors_out, index_out, 0, examples.ids(), result.features, result.losses, {}, meta)
    log.info("validation gradients: %d examples, mean loss %.4f", len(examples), float(torch.nanmean(result.losses)))


def _max_length(tokens_path: str) -> str:
    """The truncation length the tokenized file was made with (part of the feature identity)."""
    return str(token_meta(tokens_path)["max_length"])


def grads_manifest(*, tensor_paths: list[str], index_paths: list[str], out: str) -> None:
    merge_manifest(list(zip(tensor_paths, index_paths)), out)
