"""How much host memory a job holds, computed from what it loads, so a scheduler is asked for that.

Pure arithmetic on sizes the workflow knows before a job runs (the model's
config, the batch limits, the rows a job keeps); rules/common.smk turns it into
each heavy rule's ``mem_mb``. The estimates are upper bounds checked against
measured peaks (benchmarks/scale.py prints every stage's peak RSS; README "Scale").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

MB = 2**20
RUNTIME_MB = 1200  # Python + torch + transformers + pyarrow imported, before any model: ~600 MB measured, with margin
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACTIVATION_FLOATS_PER_HIDDEN = 24  # floats kept per token per layer per hidden unit for backward (attention + MLP), upper bound
MARGIN = 1.25


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int

    @property
    def n_params(self) -> int:
        """Upper bound (full multi-head attention, untied embeddings)."""
        return 2 * self.vocab * self.hidden + self.layers * (4 * self.hidden**2 + 3 * self.hidden * self.intermediate)

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        return cls(int(config["vocab_size"]), int(config["hidden_size"]), int(config.get("intermediate_size") or 4 * config["hidden_size"]), int(config["num_hidden_layers"]))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape | None:
        path = Path(model_dir) / "config.json"
        return cls.from_hf_config(json.loads(path.read_text())) if path.exists() else None


def lora_params(shape: ModelShape, r: int, n_modules: int = 4) -> int:
    """LoRA weights on ``n_modules`` hidden x hidden projections per layer (A and B)."""
    return shape.layers * n_modules * 2 * r * shape.hidden


def model_job_mb(
    shape: ModelShape,
    base_dtype: str,
    batch_tokens: int,
    lora_r: int,
    training: bool,
    activations_in_host: bool,
    checkpointing: bool = False,
    held_mb: float = 0.0,
) -> int:
    """Peak host MB of a job that loads the base model + LoRA and runs batches of ``batch_tokens``.

    Weights count 1.5x (a loading copy); LoRA weights and grads (+ AdamW m, v when
    ``training``) in fp32; activations and logits only when they live in host memory
    (a CPU run; on a GPU they are in device memory); ``held_mb``: what the job keeps
    besides (its features, its rows).
    """
    weights = 1.5 * shape.n_params * DTYPE_BYTES[base_dtype]
    lora = lora_params(shape, lora_r) * 4 * (4 if training else 2)
    activations = 0.0
    if activations_in_host:
        per_token = ACTIVATION_FLOATS_PER_HIDDEN * shape.hidden * (1 if checkpointing else shape.layers) * 4
        logits = 3 * shape.vocab * 4  # logits, log-softmax, their gradient (float32)
        activations = batch_tokens * (per_token + logits)
    return math.ceil(MARGIN * (RUNTIME_MB + (weights + lora + activations) / MB + held_mb))


def features_mb(rows: int, proj_dim: int) -> float:
    """A job's float32 features of ``rows`` samples, twice (the result and the stored copy)."""
    return 2 * rows * proj_dim * 4 / MB


def kmeans_job_mb(store_mb: float, store_dtype: str, cache_mb: float, chunk_rows: int, proj_dim: int) -> int:
    """k-means: the prepared float32 rows when they fit in ``cache_mb`` (else one block), plus a few blocks.

    Cached, the memory-mapped store's pages read by the first pass stay resident too (measured: 16.3 GB
    for a 4.3 GB fp16 store of 263k x 8192 with its 8.6 GB cache, benchmarks/scale.py).
    """
    prepared = store_mb * 4 / DTYPE_BYTES[store_dtype]
    held = prepared + store_mb if prepared <= cache_mb else 0
    blocks = 4 * chunk_rows * proj_dim * 4 / MB
    return math.ceil(MARGIN * (RUNTIME_MB + held + blocks))

