"""Exact per-sample LoRA gradients on several architectures (tiny random configs, no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tinymodels import loop_gradients, ragged_examples, random_adam_state

from clusterucb.features.gradients import AdamPreconditioner, GradientFeaturizer, PerSampleLoraGradients, pad_batch
from clusterucb.features.projection import make_projector
from clusterucb.models.lora import LoraSpec, attach_lora, attention_targets

VOCAB = 97


def build(arch: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
        return LlamaForCausalLM(config)
    if arch == "qwen2":  # biases on q, k, v
        config = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
        return Qwen2ForCausalLM(config)
    if arch == "gpt2":  # Conv1D layers, fused qkv, learned positions
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common))
    if arch == "gpt_neox":  # fused qkv, partial rotary, parallel residual
        config = GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **common
        )
        return GPTNeoXForCausalLM(config)
    raise ValueError(arch)


EXPECTED_TARGETS = {
    "llama": ["k_proj", "o_proj", "q_proj", "v_proj"],
    "qwen2": ["k_proj", "o_proj", "q_proj", "v_proj"],
    "gpt2": ["attn.c_proj", "c_attn"],
    "gpt_neox": ["dense", "query_key_value"],
}


def lora_model(arch: str):
    torch.manual_seed(0)
    model = build(arch)
    assert attention_targets(model) == EXPECTED_TARGETS[arch]
    with warnings.catch_warnings():  # peft notes fan_in_fan_out for GPT-2's Conv1D
        warnings.simplefilter("ignore")
        peft_model = attach_lora(model, LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=None, seed=0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return peft_model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_batched_per_sample_gradients_equal_batch1_loop(arch):
    model = lora_model(arch)
    # Ragged lengths up to the model's full context (64): the longest sample fills it.
    examples = ragged_examples(6, seed=11)
    examples.append({**examples[0], "input_ids": examples[0]["input_ids"] * 10})
    examples[-1]["input_ids"] = examples[-1]["input_ids"][:64]
    examples[-1]["labels"] = ([-100] * 5 + examples[-1]["input_ids"][5:])[:64]
    reference = loop_gradients(model, examples)
    grads, _ = PerSampleLoraGradients(model)(*pad_batch(examples, 0, "cpu"))
    rel = (grads - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(rel.max()) < 1e-5, (arch, rel)


@pytest.mark.parametrize("projector_kind", ["rademacher", "sjlt"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_fused_featurizer_matches_adam_then_project_of_loop_gradients(arch, projector_kind):
    """Per-module Adam + projection inside the batched pass = flat Adam then project of the batch-1 loop."""
    model = lora_model(arch)
    examples = ragged_examples(5, seed=12)
    dim = PerSampleLoraGradients(model).dim
    state = random_adam_state(dim)
    projector = make_projector(projector_kind, dim, 256, seed=3)
    fused = GradientFeaturizer(model, 0, projector, AdamPreconditioner(state), max_batch_size=3).featurize(examples)
    expected = torch.nn.functional.normalize(projector.project(AdamPreconditioner(state)(loop_gradients(model, examples))), dim=1)
    assert float((fused.features * expected).sum(1).min()) > 1 - 1e-5
