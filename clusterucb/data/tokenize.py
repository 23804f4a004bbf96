"""Tokenization with prompt-token label masking (tulu template, spec §1.2)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def concat_messages(messages: list[dict[str, str]], eos_token: str) -> str:
    """The tulu chat template of open-instruct / LESS / ClusterUCB."""
    text = ""
    for message in messages:
        role, content = message["role"], message["content"].strip()
        if role == "system":
            text += "<|system|>\n" + content + "\n"
        elif role == "user":
            text += "<|user|>\n" + content + "\n"
        elif role == "assistant":
            text += "<|assistant|>\n" + content + eos_token + "\n"
        else:
            raise ValueError(f"invalid role {role!r}")
    return text


def _ids(tokenizer, text: str, max_length: int | None, add_special_tokens: bool = True) -> list[int]:
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return tokenizer(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]


def encode_messages(messages: list[dict[str, str]], tokenizer, max_length: int, template: str = "tulu") -> tuple[list[int], list[int], int]:
    """Token ids, labels (prompt tokens = -100) and the untruncated length.

    ``template="tulu"`` follows ``encode_with_messages_format``: every
    non-assistant message and the ``<|assistant|>\\n`` marker after it are
    masked; assistant content, EOS and the trailing newline are trained.
    ``template="tokenizer"`` uses the tokenizer's own chat template, masking
    everything up to each generation prompt.
    """
    if template == "tulu":

        def render(msgs, generation_prompt):
            return concat_messages(msgs, tokenizer.eos_token) + ("<|assistant|>\n" if generation_prompt else "")

        special = True
    elif template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' asked for, but the tokenizer has no chat_template")

        def render(msgs, generation_prompt):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

        special = False  # the template renders BOS itself
    else:
        raise ValueError(f"unknown chat template {template!r} (expected 'tulu' or 'tokenizer')")

    full_text = render(messages, False)
    full_length = len(_ids(tokenizer, full_text, None, special))
    input_ids = _ids(tokenizer, full_text, max_length, special)
    labels = list(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(_ids(tokenizer, render(messages[:i], False), max_length, special))
        next_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = len(_ids(tokenizer, render(messages[: i + 1], next_is_assistant), max_length, special))
        labels[start:end] = [IGNORE_INDEX] * (min(end, len(labels)) - min(start, len(labels)))
        if end >= max_length:
            break
    return input_ids, labels, full_length


def encode_prompt_completion(
    prompt: str, completion: str, tokenizer, max_length: int, add_special_tokens: bool = True
) -> tuple[list[int], list[int], int]:
    """Validation-set encoding (spec §1.3): labels masked over ``tok.encode(prompt)``, BOS included.

    ``add_special_tokens=False`` for prompts rendered by a tokenizer's chat template, which carry their own BOS.
    """
    full_length = len(_ids(tokenizer, prompt + completion, None, add_special_tokens))
    input_ids = _ids(tokenizer, prompt + completion, max_length, add_special_tokens)
    n_prompt = len(_ids(tokenizer, prompt, None, add_special_tokens))
    labels = list(input_ids)
    labels[: min(n_prompt, len(labels))] = [IGNORE_INDEX] * min(n_prompt, len(labels))
    return input_ids, labels, full_length


@dataclass
class EncodeStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    skipped_no_target: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def encode_rows(
    rows: list[dict],
    encode,
    max_length: int,
    overlong: str = "truncate",
    on_unusable: str = "skip",
    stats: EncodeStats | None = None,
) -> list[dict]:
    """Encode ``rows`` with ``encode(row) -> (ids, labels, untruncated_length)``.

    ``overlong``: ``truncate`` (official behaviour), ``skip`` (drop and count) or
    ``error``. A row left without any trainable token cannot give a gradient:
    ``on_unusable`` = ``skip`` drops and counts it, ``error`` raises.
    """
    if overlong not in ("truncate", "skip", "error"):
        raise ValueError(f"overlong must be truncate, skip or error, got {overlong!r}")
    if on_unusable not in ("skip", "error"):
        raise ValueError(f"on_unusable must be skip or error, got {on_unusable!r}")
    stats = stats if stats is not None else EncodeStats()
    out = []
    for row in rows:
        stats.total += 1
        input_ids, labels, full_length = encode(row)
        is_long = full_length > max_length
        if is_long and overlong != "truncate":
            message = f"example {row['example_id']} has {full_length} tokens > max_length {max_length}"
            if overlong == "error":
                raise ValueError(message)
            stats.skipped_overlong += 1
            log.debug("skipping overlong %s", message)
            continue
        n_target = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # the first label is never predicted
        if n_target == 0:
            message = f"example {row['example_id']} has no trainable token within max_length {max_length}"
            if on_unusable == "error":
                raise ValueError(message)
            stats.skipped_no_target += 1
            log.debug("skipping %s", message)
            continue
        stats.truncated += int(is_long)
        stats.kept += 1
        out.append(
            {
                "example_id": row["example_id"],
                "input_ids": input_ids,
                "labels": labels,
                "n_tokens": len(input_ids),
                "n_target_tokens": n_target,
                "truncated": is_long,
            }
        )
    return out
