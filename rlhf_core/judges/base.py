"""The judge interface and the pieces every backend shares."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rlhf_core.judges.constitution import Constitution


@dataclass
class JudgeStats:
    """What a labelling run cost: for remote judges, requests, tokens and errors too."""

    comparisons: int = 0
    requests: int = 0
    retries: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Judge:
    """prefer(prompts, a, b) -> P(a better than b) for each triple, deterministic for a fixed seed.

    `order_sensitive` judges see the two responses in a sequence (LLM judges): the labeller asks
    them in both orders and combines the answers, which cancels position bias."""

    judge_id: str = "judge"
    version: str = "1"
    order_sensitive: bool = True

    def __init__(self, constitution: Constitution, principles: str = "all", seed: int = 0):
        self.constitution = constitution
        self.stats = JudgeStats()
        self.principle_mode = (
            principles  # "all", or "sample": one principle per comparison, drawn by weight
        )
        self.seed = seed

    @property
    def label_version(self) -> str:
        """Identity of the labels this judge gives: changes with the judge, its version and the constitution."""
        mode = "" if self.principle_mode == "all" else f":sample{self.seed}"
        return f"{self.judge_id}@{self.version}{mode}#{self.constitution.hash}"

    def principles_for(self, prompt: str, a: str, b: str) -> list[str] | None:
        """The principles a comparison uses: all (None), or one drawn by weight. The draw depends on the
        pair, not on the order it is asked in, so both orders apply the same principle."""
        if self.principle_mode == "all":
            return None
        first, second = sorted((a, b))
        digest = hashlib.sha256(
            f"{self.seed}\x1f{prompt}\x1f{first}\x1f{second}".encode("utf-8", "surrogatepass")
        ).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        weights = [p.weight for p in self.constitution.principles]
        edge = 0.0
        for principle, w in zip(self.constitution.principles, weights):
            edge += w / sum(weights)
            if u < edge:
                return [principle.name]
        return [self.constitution.principles[-1].name]

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def principle_scores(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> dict[str, np.ndarray] | None:
        """Per-principle preference for a over b (positive favours a), where the judge can give it."""
        return None


_HUMAN_TURN = re.compile(r"\n\nHuman:\s*(.*?)(?=\n\nAssistant:|$)", re.S)


def last_user_turn(prompt: str) -> str:
    """The request itself: for a Human/Assistant transcript, the last human turn."""
    turns = _HUMAN_TURN.findall(prompt)
    return turns[-1].strip() if turns else prompt.strip()


def judge_prompt(
    constitution: Constitution,
    prompt: str,
    first: str,
    second: str,
    principle_names: Sequence[str] | None = None,
) -> str:
    """The multiple-choice question an LLM judge answers with 'A' or 'B'."""
    principles = [
        p for p in constitution.principles if principle_names is None or p.name in principle_names
    ]
    lines = [constitution.intro, "", "Principles:"]
    lines += [f"- {p.text}" for p in principles]
    lines += [
        "",
        f"Request:\n{prompt.strip()}",
        "",
        f"Response A:\n{first.strip()}",
        "",
        f"Response B:\n{second.strip()}",
        "",
        "Which response better follows the principles? Answer with a single letter, A or B.",
    ]
    return "\n".join(lines)
