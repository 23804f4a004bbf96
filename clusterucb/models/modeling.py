"""Base models: the built-in tiny Llama (tokenizer trained on the pool, brief pretraining) or any local HF model."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clusterucb.infra.logsetup import progress

log = logging.getLogger(__name__)

BUILTIN = "builtin-tiny"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Sizes of the built-in model (``model_builtin`` in config)."""

    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class PretrainSpec:
    steps: int = 200
    batch_size: int = 16
    block_size: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; adds BOS like the Llama tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_tiny_llama(spec: TinyLlamaSpec, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(model, token_stream: np.ndarray, spec: PretrainSpec) -> list[float]:
    """Causal-LM pretraining on contiguous blocks of ``token_stream``; returns the loss curve."""
    n_blocks = len(token_stream) // spec.block_size
    if n_blocks < spec.batch_size:
        raise ValueError(f"pretraining corpus too small: {len(token_stream)} tokens < one batch of blocks")
    blocks = torch.from_numpy(token_stream[: n_blocks * spec.block_size].astype(np.int64)).view(n_blocks, spec.block_size)
    rng = np.random.default_rng(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress_ = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    order = rng.permutation(n_blocks)
    cursor = 0
    for step in progress(range(spec.steps), desc="pretrain"):
        if cursor + spec.batch_size > n_blocks:
            order, cursor = rng.permutation(n_blocks), 0
        batch = blocks[order[cursor : cursor + spec.batch_size]]
        cursor += spec.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == spec.steps - 1:
            log.info("pretrain step %d/%d loss %.4f", step + 1, spec.steps, losses[-1])
    model.eval()
    return losses


def enable_gradient_checkpointing(model) -> int:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Non-reentrant ``torch.utils.checkpoint``: the layer's first forward stays in the
    autograd graph, so gradients with respect to tensors inside a layer (the LoRA
    outputs the per-sample hooks differentiate) are exact, and the recompute runs
    after the hooks are removed. Wrapped here rather than with transformers' switch,
    which checkpoints only in training mode (dropout on); the gradient pass runs in
    eval mode. Returns how many layers were wrapped.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapped = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and "forward" not in vars(module):
            forward = module.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():  # generation / evaluation: nothing to recompute
                    return _forward(*args, **kwargs)
                # A KV cache would be written twice (forward and recompute), as transformers' own switch knows.
                for key in ("cache", "past_key_values", "past_key_value"):
                    if key in kwargs:
                        kwargs[key] = None
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            module.forward = checkpointed
            wrapped += 1
    if not wrapped:
        raise ValueError(f"gradient checkpointing: no decoder layer found in {type(model).__name__}")
    return wrapped


def drop_gguf_quantizer(model) -> None:
    """transformers dequantises GGUF weights on load but keeps the quantizer marker, which makes
    save_pretrained refuse; the tensors are plain floats by then."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local HF directory or a ``.gguf`` file (eval mode).

    A tokenizer without a pad token pads with EOS: padded positions are masked
    out of attention and loss, so the pad id never changes a result (and the
    embeddings need no resizing, unlike the official code's added ``<pad>``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"base model not found: {path}")
    if path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        source = str(path.parent)
    else:
        kwargs = {}
        source = str(path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    model.eval()
    return model, tokenizer
