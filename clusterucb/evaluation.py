"""Target-task evaluation: GSM8K exact match with few-shot CoT, and target loss of reference answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from clusterucb.data import gsm8k
from clusterucb.data.tokenize import encode_prompt_completion
from clusterucb.gradients import length_batches, pad_batch, token_losses
from clusterucb.logsetup import progress

log = logging.getLogger(__name__)

STOP = "\n\n"  # open-instruct's --stop_at_double_newline


@dataclass(frozen=True)
class EvalSpec:
    n_shot: int = 8
    max_new_tokens: int = 512
    batch_size: int = 8
    max_length: int = 2048  # for the target-loss prompts + answers


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device="cpu") -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at the first blank line."""
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(prompts)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    batches = length_batches([len(e) for e in encoded], batch_size, 10**9)
    for batch in progress(batches, desc="generate"):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=[STOP],
            tokenizer=tokenizer,
        )
        for row, index in enumerate(batch):
            text = tokenizer.decode(generated[row, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs[index] = text.split(STOP)[0]
    return outputs


def fit_fewshot_prompt(question: str, n_shot: int, tokenizer, budget: int) -> tuple[str, int]:
    """The n-shot prompt, dropping exemplars while it exceeds ``budget`` tokens (as the official MMLU eval does)."""
    for shots in range(n_shot, -1, -1):
        prompt = gsm8k.fewshot_prompt(question, shots)
        if len(tokenizer(prompt)["input_ids"]) <= budget:
            return prompt, shots
    raise ValueError(f"the question alone exceeds the model's context ({budget} tokens for the prompt): {question[:80]!r}")


def evaluate_gsm8k(model, tokenizer, rows: list[dict], spec: EvalSpec, context_length: int, device="cpu") -> tuple[dict, list[dict]]:
    """Exact match of the last number of each greedy CoT answer against the gold answer."""
    budget = context_length - spec.max_new_tokens
    fitted = [fit_fewshot_prompt(r["question"], spec.n_shot, tokenizer, budget) for r in rows]
    reduced = sum(1 for _, shots in fitted if shots < spec.n_shot)
    if reduced:
        log.warning("%d prompts used fewer than %d exemplars to fit the context", reduced, spec.n_shot)
    outputs = generate_greedy(model, tokenizer, [p for p, _ in fitted], spec.max_new_tokens, spec.batch_size, device)
    records = []
    for row, output, (_, shots) in zip(rows, outputs, fitted):
        prediction = gsm8k.extract_prediction(output)
        records.append(
            {"example_id": row["example_id"], "n_shot": shots, "output": output, "prediction": prediction, "gold": row["gold"], "correct": gsm8k.is_correct(prediction, row["gold"])}
        )
    accuracy = sum(r["correct"] for r in records) / len(records)
    return {"exact_match": accuracy, "n_examples": len(records), "n_prompts_with_fewer_shots": reduced}, records


@torch.no_grad()
def target_loss(model, tokenizer, rows: list[dict], max_length: int, batch_size: int, device="cpu") -> dict:
    """Mean token NLL of the reference answers given the zero-shot target prompt (token-weighted)."""
    examples = []
    for row in rows:
        prompt, completion = gsm8k.validation_example(row)
        input_ids, labels, _ = encode_prompt_completion(prompt, completion, tokenizer, max_length)
        examples.append({"input_ids": input_ids, "labels": labels})
    total_nll, total_tokens, per_example = 0.0, 0, []
    for batch in length_batches([len(e["input_ids"]) for e in examples], batch_size, 10**9):
        input_ids, attention_mask, labels = pad_batch([examples[i] for i in batch], tokenizer.pad_token_id, device)
        nll, n = token_losses(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
        total_nll += float(nll.sum())
        total_tokens += int(n.sum())
        per_example.extend((nll.sum(1) / n.clamp(min=1)).tolist())
    return {"target_loss": total_nll / total_tokens, "target_loss_per_example_mean": sum(per_example) / len(per_example), "target_tokens": total_tokens}
