"""How much host memory a job holds, computed from what it loads, so a scheduler is asked for that;
and how much GPU memory each heavy job needs, so a run that cannot fit its card says so before it starts.

Pure arithmetic on sizes the workflow knows before a job runs (the model's
config, the batch limits, the rows a job keeps); rules/common.smk turns it into
each heavy rule's ``mem_mb``. The estimates are upper bounds checked against
measured peaks (benchmarks/scale.py prints every stage's peak RSS; README "Scale").

GPU memory (:func:`gpu_plan`, printed by the workflow at start, docs/gpu.md): per heavy job, the base
weights in ``precision.base_dtype``, LoRA weights (+ gradients and AdamW moments when training) in
float32, the projector's and Adam feature state of a gradient pass, activations and logits of one batch
(``train.micro_batch`` x ``data.max_length`` tokens for training; the gradient batch limits), with and
without gradient checkpointing, and the KV cache of generation. Training and gradient jobs halve their
batch on out-of-memory, so what must fit is the job at *one example*; a job whose one-example estimate is
above the card memory (``precision.gpu_memory_gb``) is sure to fail, and the workflow warns before it runs.
These are estimates (no allocator fragmentation, attention by a fused kernel that keeps no T x T scores),
not measurements: benchmarks/gpu_check.py measures peaks on a real card.
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
    kv_hidden: int | None = None  # key/value width (num_key_value_heads x head_dim); None: hidden (no GQA)
    context: int = 4096  # max_position_embeddings

    @property
    def n_params(self) -> int:
        """Upper bound (full multi-head attention, untied embeddings)."""
        return 2 * self.vocab * self.hidden + self.layers * (4 * self.hidden**2 + 3 * self.hidden * self.intermediate)

    @property
    def kv(self) -> int:
        return self.kv_hidden or self.hidden

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads") or 1)
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv_hidden = int(config.get("num_key_value_heads") or heads) * head_dim
        return cls(
            int(config["vocab_size"]),
            hidden,
            int(config.get("intermediate_size") or 4 * hidden),
            int(config["num_hidden_layers"]),
            kv_hidden,
            int(config.get("max_position_embeddings") or 4096),
        )

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
    activations = 0.0
    if activations_in_host:
        per_token = ACTIVATION_FLOATS_PER_HIDDEN * shape.hidden * (1 if checkpointing else shape.layers) * 4
        logits = 3 * shape.vocab * 4  # logits, log-softmax, their gradient (float32)
        activations = batch_tokens * (per_token + logits)
    lora_copies = 4 if training else 2  # weights and gradients, + AdamW's m and v when training
    return host_job_mb((loaded_model_bytes(shape, base_dtype, lora_r, lora_copies) + activations) / MB + held_mb)


def loaded_model_bytes(shape: ModelShape, base_dtype: str, lora_r: int, lora_copies: int) -> float:
    """The base weights, counted 1.5x (a loading copy), and ``lora_copies`` float32 copies of the LoRA weights."""
    return 1.5 * shape.n_params * DTYPE_BYTES[base_dtype] + lora_params(shape, lora_r) * 4 * lora_copies


def host_job_mb(held_mb: float) -> int:
    """A job's host memory request: the runtime and what it holds, with the margin every estimate takes."""
    return math.ceil(MARGIN * (RUNTIME_MB + held_mb))


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
    return host_job_mb(held + blocks)


# ---------------------------------------------------------------- GPU memory

CUDA_CONTEXT_MB = 600  # the CUDA context, cuBLAS workspaces and allocator slack (a bare context is ~500 MB on an H100)
LORA_INPUT_COPIES = 4  # float32 copies of an adapted layer's input (peft casts it per adapted module: q, k, v, o)
LM_MAX_BATCH_TOKENS = 16384  # clusterucb.models.lm.LanguageModel's prompt-token budget per generation batch
PROJECTOR_CACHE_MB = 2048  # clusterucb.features.projection.Projector's default cache_bytes
DENSE_STREAM_MB = 256 + 64  # an uncached dense projection's expanded signs and hash words (RademacherProjector.GPU_STREAM_BYTES)
KMEANS_CHUNK = 16384


@dataclass(frozen=True)
class GpuEstimate:
    """GPU memory of one heavy job, MB: what it holds whatever the batch, and what one batch adds."""

    job: str
    tokens: int  # tokens per forward at the configured batch
    tokens_one: int  # tokens of one example: where the OOM back-off ends
    weights_mb: float
    lora_mb: float
    state_mb: float  # projector cache, Adam feature moments, k-means rows
    batch_mb: float  # activations + logits (or the KV cache) at the configured batch
    one_mb: float  # the same at one example
    backs_off: bool  # halves its batch on out-of-memory (training, gradients)
    remedy: str = "bfloat16 base weights, gradient checkpointing, a shorter data.max_length, or a larger card"

    @property
    def fixed_mb(self) -> float:
        return CUDA_CONTEXT_MB + self.weights_mb + self.lora_mb + self.state_mb

    @property
    def total_mb(self) -> float:
        return self.fixed_mb + self.batch_mb

    @property
    def floor_mb(self) -> float:
        """What must fit: the configured batch for a job without back-off, one example for one with it."""
        return self.fixed_mb + (self.one_mb if self.backs_off else self.batch_mb)


def activations_mb(shape: ModelShape, base_dtype: str, tokens: int, checkpointing: bool) -> float:
    """Activations a backward pass keeps, and the logits with their float32 loss copy and gradient.

    Without checkpointing every layer's (``ACTIVATION_FLOATS_PER_HIDDEN`` x hidden values per token in the
    base dtype, plus the float32 inputs of the LoRA factors); with it, each layer's input and one layer's.
    """
    b = DTYPE_BYTES[base_dtype]
    per_layer = ACTIVATION_FLOATS_PER_HIDDEN * shape.hidden * b + LORA_INPUT_COPIES * shape.hidden * 4
    kept = per_layer + shape.layers * shape.hidden * b if checkpointing else shape.layers * per_layer
    logits = shape.vocab * (b + 8)
    return tokens * (kept + logits) / MB


def layer_values_mb(shape: ModelShape, base_dtype: str, tokens: int) -> float:
    """One layer's transient values of a forward without gradient (attention and MLP), over ``tokens``."""
    return tokens * (8 * shape.hidden + 2 * shape.intermediate) * DTYPE_BYTES[base_dtype] / MB


def inference_mb(shape: ModelShape, base_dtype: str, tokens: int, loss: bool = False) -> float:
    """A forward without gradient: one layer's transient values and the logits (with their float32 copy).

    ``loss``: the logits go through a float32 cross-entropy (clusterucb.features.gradients.token_losses): half-
    precision logits are cast to a float32 copy, and log-softmax writes another float32 tensor beside it.
    """
    b = DTYPE_BYTES[base_dtype]
    float_copies = 8 if loss and b < 4 else 4
    return layer_values_mb(shape, base_dtype, tokens) + tokens * shape.vocab * (b + float_copies) / MB


def kv_cache_mb(shape: ModelShape, base_dtype: str, tokens: int) -> float:
    return 2 * shape.layers * shape.kv * tokens * DTYPE_BYTES[base_dtype] / MB


@dataclass(frozen=True)
class EvaluationBatch:
    """Evaluation's largest forward without gradient (clusterucb.models.lm.LanguageModel's batching)."""

    tokens: int  # tokens of its largest forward (or KV cache)
    tokens_one: int  # one example: its prompt within val_max_length, and its answer
    batch_mb: float
    one_mb: float


def evaluation_batch(
    shape: ModelShape,
    base_dtype: str,
    eval_batch: int,
    val_max_length: int,
    max_new_tokens: int,
    generation_batch: int | None = None,
    task_metric: bool = True,
) -> EvaluationBatch:
    """The larger of: a target-loss batch (``eval_batch`` x ``val_max_length`` tokens, whole-sequence logits); with
    the task metric, a scoring batch (prompts of any length up to LanguageModel's token budget, whole-sequence
    logits) and a generation batch (its KV cache for prompts + ``max_new_tokens``, one step's values).
    Without the task metric (``target.settings.<task>.task_metric: false``) only the target loss runs."""
    one = min(shape.context, val_max_length + max_new_tokens)
    nll_tokens = min(eval_batch * val_max_length, max(LM_MAX_BATCH_TOKENS, val_max_length))
    tokens, batch_mb = nll_tokens, inference_mb(shape, base_dtype, nll_tokens, loss=True)
    if task_metric:
        batch = max(eval_batch, generation_batch or 0)
        scoring_tokens = min(eval_batch * shape.context, LM_MAX_BATCH_TOKENS)
        # greedy: prompts share the token budget, each grows by max_new_tokens; pass@k: n copies of one prompt
        prompt_tokens = max(scoring_tokens, (generation_batch or 0) * min(shape.context, val_max_length))
        kv_tokens = max(min(eval_batch * shape.context, LM_MAX_BATCH_TOKENS + eval_batch * max_new_tokens), (generation_batch or 0) * one)
        tokens = max(tokens, scoring_tokens, kv_tokens)
        batch_mb = max(
            batch_mb,
            inference_mb(shape, base_dtype, scoring_tokens),
            # the prompt pass: one layer's values over every prompt token beside the cache it fills
            kv_cache_mb(shape, base_dtype, kv_tokens)
            + layer_values_mb(shape, base_dtype, prompt_tokens)
            + inference_mb(shape, base_dtype, batch),
        )
    one_mb = kv_cache_mb(shape, base_dtype, one) + inference_mb(shape, base_dtype, one)
    return EvaluationBatch(tokens, one, batch_mb, one_mb)


def evaluate_job_mb(shape: ModelShape, base_dtype: str, lora_r: int, evaluation: EvaluationBatch, activations_in_host: bool) -> int:
    """Peak host MB of an evaluation: the base model (1.5x, a loading copy) and LoRA in float32 without gradients,
    and, on CPU, its largest forward without gradient. No backward runs, so no layer's activations are kept:
    :func:`model_job_mb` would count them (46.8 GB for SmolLM2-135M at 8 x 2048 tokens, against the 7.1 GB
    measured)."""
    batch = evaluation.batch_mb if activations_in_host else 0.0
    return host_job_mb(loaded_model_bytes(shape, base_dtype, lora_r, lora_copies=1) / MB + batch)


def gpu_plan(
    config: dict, shape: ModelShape, pool_rows: int, max_new_tokens: int, generation_batch: int | None = None
) -> list[GpuEstimate]:
    """The GPU estimate of every heavy job of a run with ``config`` (the workflow's resolved config).

    ``max_new_tokens``: the largest generation budget of the target tasks; ``generation_batch``: the largest
    number of sequences generated at once (``target.eval_batch_size``, or a pass@k's n for one prompt).
    """
    precision, lora, train, data, grads = config["precision"], config["lora"], config["train"], config["data"], config["gradients"]
    dtype, checkpointing = precision["base_dtype"], bool(precision["gradient_checkpointing"])
    weights = shape.n_params * DTYPE_BYTES[dtype] / MB
    n_modules = len(lora["target_modules"]) if lora.get("target_modules") else 4
    lora_n = lora_params(shape, lora["r"], n_modules)
    plans = []

    train_one = data["max_length"]
    train_tokens = train["micro_batch"] * train_one
    plans.append(
        GpuEstimate(
            "training (warmup_lora, less_warmup, train_epoch)",
            train_tokens,
            train_one,
            weights,
            lora_n * 16 / MB,
            0.0,
            activations_mb(shape, dtype, train_tokens, checkpointing),
            activations_mb(shape, dtype, train_one, checkpointing),
            True,
        )
    )

    if grads["projector"] == "sjlt":
        projector = min(lora_n * grads.get("sjlt_c", 1) * 12 / MB, PROJECTOR_CACHE_MB)
    else:
        matrix = lora_n * grads["proj_dim"] * 4 / MB  # cached whole when it fits, else the cache plus a streamed block
        projector = matrix if matrix <= PROJECTOR_CACHE_MB else PROJECTOR_CACHE_MB + DENSE_STREAM_MB
    per_sample = 4 * grads["max_batch_size"] * lora["r"] * shape.hidden * 4 / MB  # one module's per-sample gradients, Adam copies
    for job, key, adam in (
        ("pool gradients (grads_pool_shard, select_budgeted)", "max_length", True),
        ("validation gradients (grads_val)", "val_max_length", False),
    ):
        length = data[key]
        tokens = max(min(grads["max_batch_size"] * length, grads["max_batch_tokens"]), length)
        state = projector + (2 * lora_n * 4 / MB if adam else 0) + per_sample
        plans.append(
            GpuEstimate(
                job,
                tokens,
                length,
                weights,
                lora_n * 8 / MB,
                state,
                activations_mb(shape, dtype, tokens, checkpointing),
                activations_mb(shape, dtype, length, checkpointing),
                True,
                f"bfloat16 base weights, gradient checkpointing, a shorter data.{key}, or a larger card",
            )
        )

    evaluation = evaluation_batch(
        shape, dtype, config["target"]["eval_batch_size"], data["val_max_length"], max_new_tokens, generation_batch
    )
    plans.append(
        GpuEstimate(
            "evaluation (evaluate: generation, target loss)",
            evaluation.tokens,
            evaluation.tokens_one,
            weights,
            lora_n * 4 / MB,
            0.0,
            evaluation.batch_mb,
            evaluation.one_mb,
            False,
            "a smaller target.eval_batch_size or data.val_max_length, bfloat16 base weights, or a larger card",
        )
    )

    dim = grads["proj_dim"]
    rows_mb = pool_rows * dim * 4 / MB
    cached = rows_mb if rows_mb <= config["cluster"]["cache_mb"] else 0.0
    blocks = (3 * KMEANS_CHUNK * dim + 2 * KMEANS_CHUNK * config["cluster"]["k"]) * 4 / MB
    plans.append(
        GpuEstimate(
            "k-means (kmeans)",
            KMEANS_CHUNK,
            KMEANS_CHUNK,
            0.0,
            0.0,
            cached,
            blocks,
            blocks,
            False,
            "a cluster.cache_mb below the features' size (they are then streamed), or a larger card",
        )
    )
    return plans


def format_gpu_plan(plans: list[GpuEstimate], gpu_memory_gb: float | None) -> tuple[list[str], list[str]]:
    """(table lines, warnings): the estimate per job, and each job sure to run out of a ``gpu_memory_gb`` card."""
    gb = 1024.0
    lines = [
        f"GPU memory estimate per job, GB (clusterucb/infra/resources.py; card: {f'{gpu_memory_gb:g} GB' if gpu_memory_gb else 'unknown, set precision.gpu_memory_gb'}):",
        f"  {'job':<52} {'weights':>8} {'LoRA+opt':>8} {'state':>7} {'batch':>7} {'tokens':>7} {'total':>7} {'must fit':>8}",
    ]
    warnings = []
    for plan in plans:
        lines.append(
            f"  {plan.job:<52} {plan.weights_mb / gb:>8.2f} {plan.lora_mb / gb:>8.2f} {plan.state_mb / gb:>7.2f} "
            f"{plan.batch_mb / gb:>7.2f} {plan.tokens:>7d} {plan.total_mb / gb:>7.2f} {plan.floor_mb / gb:>8.2f}"
        )
        if not gpu_memory_gb:
            continue
        card = gpu_memory_gb * gb
        if plan.floor_mb > card:
            what = "even one example" if plan.backs_off else "it"
            warnings.append(
                f"{plan.job}: sure to run out of GPU memory: {what} needs ~{plan.floor_mb / gb:.1f} GB of the card's "
                f"{gpu_memory_gb:g} GB (try {plan.remedy})"
            )
        elif plan.total_mb > card:
            warnings.append(
                f"{plan.job}: its configured batch (~{plan.total_mb / gb:.1f} GB) does not fit {gpu_memory_gb:g} GB; the job "
                "halves it on out-of-memory (same results, a little more time): lower it to skip the failed tries"
            )
    return lines, warnings
