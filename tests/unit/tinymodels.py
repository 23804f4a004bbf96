"""Tiny random LoRA models and ragged token batches built in-process (no downloads)."""

from __future__ import annotations

import torch

from clusterucb.data.tokenize import IGNORE_INDEX
from clusterucb.models.lora import LoraSpec, attach_lora

VOCAB = 97


def tiny_lora_llama(seed: int = 0, r: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    peft_model = attach_lora(model, LoraSpec(r=r, alpha=8, dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=seed))
    # A fresh LoRA has B = 0, which makes every dA zero: give B values so both factors are tested.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return peft_model.eval()


def random_adam_state(dim: int, seed: int = 1):
    """Plausible AdamW moments (m ~ 1e-3, v ~ 1e-5) for a LoRA of ``dim`` parameters."""
    from clusterucb.features.gradients import AdamState

    g = torch.Generator().manual_seed(seed)
    return AdamState(torch.randn(dim, generator=g) * 1e-3, torch.rand(dim, generator=g) * 1e-5, 0.9, 0.999, 1e-8)


def ragged_examples(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        n_prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        examples.append({"example_id": f"ex{i}", "input_ids": ids, "labels": labels})
    return examples


def loop_gradients(model, examples) -> torch.Tensor:
    """The LESS way: batch size 1, model(...).loss.backward(), concatenate .grad in named_parameters order."""
    rows = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]))
        out.loss.backward()
        rows.append(torch.cat([p.grad.flatten() for _, p in model.named_parameters() if p.requires_grad]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


TEXTS = [
    "The grove has 15 trees. Workers plant more trees today. How many trees are there now?",
    "def add(a, b):\n    return a + b",
    "Question: what is 12 plus 30? Answer: 42.",
    "A train leaves at noon and arrives at three; the trip takes three hours.",
]


def saved_tiny_llama(directory, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 300):
    """A tiny random Llama and its BPE tokenizer (trained on a few sentences) saved as a model directory, so the
    workflow's real load path (``load_base_model``: dtype, tokenizer, pad token) can be used on it."""
    from clusterucb.models.modeling import TinyLlamaSpec, build_tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(TEXTS * 10, vocab)
    spec = TinyLlamaSpec(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=1024,
    )
    model = build_tiny_llama(spec, tokenizer, seed)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def train_killed_at_step(monkeypatch, step: int, train) -> None:
    """Call ``train()`` as a job killed at optimizer step ``step`` (the trainer's schedule raises there)."""
    import pytest

    import clusterucb.training.trainer as training

    original = training.linear_schedule

    def dies(at, total, warmup):
        if at == step:
            raise KeyboardInterrupt("killed")
        return original(at, total, warmup)

    monkeypatch.setattr(training, "linear_schedule", dies)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(training, "linear_schedule", original)
