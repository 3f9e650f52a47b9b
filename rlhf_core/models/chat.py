"""Prompt/response formatting in one place, used identically by SFT, labelling, reward
scoring, PPO and evaluation: the tokenizer's chat template when it has one, else a plain
Human/Assistant template."""

from __future__ import annotations

import re
from dataclasses import dataclass

PLAIN_HUMAN = "\n\nHuman: "
PLAIN_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def transcript_messages(prompt: str) -> list[dict[str, str]] | None:
    """An HH-RLHF transcript ('Human: ... Assistant: ... Human: ... Assistant:') as chat
    messages, the open assistant turn left for the model; None when the prompt is not one.

    Consecutive turns of one speaker are merged: chat templates expect the roles to alternate."""
    text = prompt.strip()
    if not (text.startswith("Human:") and text.endswith("Assistant:")):
        return None
    parts = _TURN.split(text)
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}".strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if not messages or messages[-1] != {"role": "assistant", "content": ""}:
        return None
    return messages[:-1] if len(messages) > 1 else None


def end_of_turn_token(tokenizer) -> str | None:
    """The special token a chat template closes an assistant turn with ('<|im_end|>',
    '<|eot_id|>', '<end_of_turn>'); None without a template or when the turn ends in plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7xMarker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # a template that refuses this shape: keep the tokenizer's own EOS
        return None
    after = text[text.rfind(marker) + len(marker) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    if not ids or ids[0] not in set(tokenizer.all_special_ids):
        return None
    return tokenizer.convert_ids_to_tokens(ids[0])


def stop_at_end_of_turn(tokenizer) -> None:
    """Make the template's end-of-turn token the tokenizer's EOS, so every stage that samples
    or appends EOS stops where the template ends a turn (Llama 3's '<|eot_id|>' is not its EOS)."""
    token = end_of_turn_token(tokenizer)
    if token is not None and token != tokenizer.eos_token:
        tokenizer.eos_token = token


@dataclass
class ChatFormat:
    tokenizer: object
    use_chat_template: bool = True

    @property
    def has_template(self) -> bool:
        return self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_text(self, prompt: str) -> str:
        """Everything the model sees before its response."""
        if self.has_template:
            messages = transcript_messages(prompt) or [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        if prompt.rstrip().endswith("Assistant:"):  # already a Human/Assistant transcript (HH-RLHF)
            return prompt.rstrip()
        return f"{PLAIN_HUMAN}{prompt.strip()}{PLAIN_ASSISTANT}"

    def response_text(self, response: str) -> str:
        """The response as it follows the prompt text (EOS is added as a token, not as text)."""
        return response.strip() if self.has_template else " " + response.strip()

    def encode(
        self, prompt: str, response: str | None = None, add_eos: bool = True
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids). Tokenised separately so the boundary is exact: the
        response ids are what the policy would generate after the prompt."""
        tok = self.tokenizer
        prompt_ids = tok(self.prompt_text(prompt), add_special_tokens=not self.has_template)[
            "input_ids"
        ]
        if response is None:
            return prompt_ids, []
        response_ids = tok(self.response_text(response), add_special_tokens=False)["input_ids"]
        if add_eos and tok.eos_token_id is not None:
            response_ids = response_ids + [tok.eos_token_id]
        return prompt_ids, response_ids
