"""A causal LM as the evaluations use it: batched generation with a KV cache, next-token choice scores, completion NLL.

Task modules evaluate against this interface only; it knows nothing of any task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from clusterucb.data.chat import ChatFormat
from clusterucb.data.tokenize import encode_prompt_completion
from clusterucb.features.gradients import length_batches, pad_batch, token_losses
from clusterucb.infra.logsetup import progress

log = logging.getLogger(__name__)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence (excluded)."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


class LanguageModel:
    """``model`` in eval mode with its tokenizer and chat format; ``batch_size`` prompts per forward.

    ``seed`` seeds sampled generation (per prompt); ``workers`` is how many CPU workers a task may use
    beside the model (HumanEval's sandboxed test runs).
    """

    def __init__(
        self,
        model,
        tokenizer,
        chat: ChatFormat,
        device="cpu",
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
        seed: int = 0,
        workers: int = 1,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat = chat
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.seed = seed
        self.workers = workers

    # ------------------------------------------------------------ tokens

    def ids(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt (BOS as the chat format wants it)."""
        return self.chat.ids(prompt)

    def n_tokens(self, prompt: str) -> int:
        return len(self.ids(prompt))

    def last_token_id(self, text: str) -> int:
        """The id of the last token of ``text`` (open-instruct's MMLU answer ids: ``encode(" A")[-1]``)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-1]

    def fits(self, prompt: str, new_tokens: int) -> bool:
        return self.n_tokens(prompt) + new_tokens <= self.context_length

    def truncate(self, text: str, max_tokens: int) -> str:
        """The first ``max_tokens`` tokens of ``text`` (no special tokens), decoded back to text."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)

    # ------------------------------------------------------------ generation

    def _generate(self, encoded: list[list[int]], **kwargs) -> torch.Tensor:
        length = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends at the last column
            input_ids[row, length - len(ids) :] = torch.as_tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
            **kwargs,
        )
        return out[:, length:]

    def _decode(self, tokens: list[int], stops: Sequence[str]) -> str:
        return cut_at_stops(self.tokenizer.decode(tokens, skip_special_tokens=True), stops)

    @torch.no_grad()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str] = (), desc: str = "generate") -> list[str]:
        """Greedy continuations, batched by length (left-padded, KV cache), each cut at its first stop sequence."""
        encoded = [self.ids(p) for p in prompts]
        outputs = [""] * len(prompts)
        batches = length_batches([len(e) for e in encoded], self.batch_size, self.max_batch_tokens)
        extra = {"stop_strings": list(stops), "tokenizer": self.tokenizer} if stops else {}
        done = 0
        for batch in progress(batches, desc=desc):
            generated = self._generate(
                [encoded[i] for i in batch], max_new_tokens=max_new_tokens, do_sample=False, **extra
            ).tolist()  # one copy to the host per batch
            for row, index in enumerate(batch):
                outputs[index] = self._decode(generated[row], stops)
            done += len(batch)
            log.debug("%s: %d/%d prompts", desc, done, len(prompts))
        log.info("%s: %d prompts, greedy, up to %d new tokens", desc, len(prompts), max_new_tokens)
        return outputs

    @torch.no_grad()
    def sample(
        self, prompt: str, n: int, temperature: float, top_p: float, max_new_tokens: int, stops: Sequence[str], seed: int
    ) -> list[str]:
        """``n`` sampled continuations of one prompt; seeded per prompt, so results do not depend on batching."""
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        extra = {"stop_strings": list(stops), "tokenizer": self.tokenizer} if stops else {}
        generated = self._generate(
            [self.ids(prompt)],
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            num_return_sequences=n,
            **extra,
        )
        return [self._decode(row, stops) for row in generated.tolist()]

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def next_token_logits(self, prompts: Sequence[str], candidate_ids: Sequence[int]) -> torch.Tensor:
        """(N, C) next-token logits of each prompt at the candidate token ids (right-padded batches, one forward each)."""
        encoded = [self.ids(p) for p in prompts]
        out = torch.empty(len(prompts), len(candidate_ids), dtype=torch.float32)
        candidates = torch.as_tensor(list(candidate_ids), device=self.device)
        for batch in progress(length_batches([len(e) for e in encoded], self.batch_size, self.max_batch_tokens), desc="score"):
            rows = [{"input_ids": encoded[i], "labels": encoded[i]} for i in batch]
            input_ids, attention_mask, _ = pad_batch(rows, self.tokenizer.pad_token_id, self.device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            last = attention_mask.sum(1) - 1
            picked = logits[torch.arange(len(batch), device=self.device), last][:, candidates]
            out[torch.as_tensor(batch)] = picked.float().cpu()
        return out

    @torch.no_grad()
    def completion_nll(self, triples: Sequence[tuple[str, str, str]], max_length: int) -> dict:
        """Token-weighted mean NLL of each completion given its (user, assistant_prefix) prompt: the target loss."""
        examples = []
        for user, prefix, completion in triples:
            input_ids, labels, _ = encode_prompt_completion(
                self.chat.prompt(user, prefix), completion, self.tokenizer, max_length, self.chat.add_special_tokens
            )
            examples.append({"input_ids": input_ids, "labels": labels})
        total_nll, total_tokens, per_example = 0.0, 0, []
        for batch in length_batches([len(e["input_ids"]) for e in examples], self.batch_size, self.max_batch_tokens):
            input_ids, attention_mask, labels = pad_batch([examples[i] for i in batch], self.tokenizer.pad_token_id, self.device)
            nll, n = token_losses(self.model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
            sums, counts = torch.stack([nll.sum(1).double(), n.double()]).cpu()  # one copy to the host per batch
            total_nll += float(sums.sum())
            total_tokens += int(counts.sum())
            per_example.extend((sums / counts.clamp(min=1)).tolist())
        if total_tokens == 0:
            raise ValueError(f"no reference-answer token left within max_length {max_length}: the target loss is undefined")
        return {
            "target_loss": total_nll / total_tokens,
            "target_loss_per_example_mean": sum(per_example) / len(per_example),
            "target_tokens": total_tokens,
        }
