"""Stages: the base model (built-in tiny Llama, or a GGUF file converted once) and checkpoint loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clusterucb.data.tokenize import concat_messages
from clusterucb.infra.devices import base_dtype
from clusterucb.infra.io import atomic_dir
from clusterucb.models.lora import load_lora
from clusterucb.models.modeling import (
    PretrainSpec,
    TinyLlamaSpec,
    build_tiny_llama,
    drop_gguf_quantizer,
    load_base_model,
    pretrain,
    train_tokenizer,
)

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def build_builtin_model(*, pool_path: str, out_dir: str, sizes: dict, pretrain_params: dict, seed: int) -> None:
    """Train a BPE tokenizer on the tulu-formatted pool, build the tiny Llama and pretrain it briefly on the pool."""
    rows = pq.read_table(pool_path, columns=["messages"]).column("messages").to_pylist()
    texts = [concat_messages(messages, "</s>") for messages in rows]
    spec = TinyLlamaSpec(**sizes)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    model = build_tiny_llama(spec, tokenizer, seed)
    stream = np.concatenate([np.asarray(tokenizer(t)["input_ids"], dtype=np.int32) for t in texts])
    log.info(
        "built tiny Llama: %d parameters, vocab %d; pretraining on %d pool tokens",
        sum(p.numel() for p in model.parameters()),
        len(tokenizer),
        len(stream),
    )
    losses = pretrain(model, stream, PretrainSpec(seed=seed, **pretrain_params))
    with atomic_dir(out_dir, last=WEIGHTS) as tmp:
        tokenizer.save_pretrained(str(tmp))
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "pretrain_log.json").write_text(json.dumps({"losses": losses, "pool_tokens": int(len(stream))}))
    log.info("pretraining loss %.3f -> %.3f", losses[0], losses[-1])


def convert_gguf(*, gguf_path: str, out_dir: str) -> None:
    """Dequantise a GGUF model once into a Hugging Face directory (fp32 safetensors)."""
    model, tokenizer = load_base_model(gguf_path)
    drop_gguf_quantizer(model)
    with atomic_dir(out_dir, last=WEIGHTS) as tmp:
        tokenizer.save_pretrained(str(tmp))
        model.save_pretrained(str(tmp), safe_serialization=True)
    log.info("converted %s: %d parameters", gguf_path, sum(p.numel() for p in model.parameters()))


def load_checkpoint(model_dir: str, adapter_dir: str | Path, dtype: str = "float32", device="cpu"):
    """Base model (weights in ``dtype``) + LoRA adapter (float32) on ``device`` (claim it first) for gradients:
    eval mode (no dropout), LoRA weights requiring grad."""
    model, tokenizer = load_base_model(model_dir, base_dtype(dtype))
    peft_model = load_lora(model.to(device), adapter_dir, trainable=True, device=device)
    peft_model.eval()
    return peft_model, tokenizer
