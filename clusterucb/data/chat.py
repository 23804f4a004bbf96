"""How a single user turn and the start of the assistant's answer become a prompt string.

Validation prompts (gradient targets), evaluation prompts and target-loss prompts
of every task go through one :class:`ChatFormat`, so they use the same template
as the pool: ``tulu`` (open-instruct's, spec §1.2: ``<|user|>\\n`` + content +
``\\n<|assistant|>\\n``, the tokenizer adding BOS) or ``tokenizer`` (the model's
own chat template, which renders BOS itself).
"""

from __future__ import annotations

TEMPLATES = ("tulu", "tokenizer")


class ChatFormat:
    def __init__(self, template: str, tokenizer):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r} (expected one of {TEMPLATES})")
        if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat template 'tokenizer' asked for, but the tokenizer has no chat_template")
        self.template = template
        self.tokenizer = tokenizer
        # tulu text carries no BOS, the tokenizer adds it; a tokenizer's template renders its own.
        self.add_special_tokens = template == "tulu"

    def user_turn(self, user: str) -> str:
        """The rendered user turn, ending where the assistant's answer starts (content not stripped, as the eval template)."""
        if self.template == "tulu":
            return "<|user|>\n" + user + "\n<|assistant|>\n"
        messages = [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt(self, user: str, assistant_prefix: str = "") -> str:
        """User turn + the first words of the answer (open-instruct: a space is added only if the turn does not end in one)."""
        turn = self.user_turn(user)
        if assistant_prefix and turn and turn[-1] not in "\n ":
            return turn + " " + assistant_prefix
        return turn + assistant_prefix

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]
