"""Prompt/response formatting in one place, used identically by SFT, labelling, reward
scoring, PPO and evaluation: the tokenizer's chat template when it has one, else a plain
Human/Assistant template."""

from __future__ import annotations

from dataclasses import dataclass

PLAIN_HUMAN = "\n\nHuman: "
PLAIN_ASSISTANT = "\n\nAssistant:"


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
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
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
