"""Labelling pairs with a judge: a persistent cache, both-order position-bias control, agreement."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf_core.judges.base import Judge
from rlhf_core.metrics import accuracy, calibration_curve, cohen_kappa, expected_calibration_error


class LabelCache:
    """SQLite cache of P(a > b) keyed by (judge id and version, constitution hash, prompt, a, b):
    re-running never asks the judge again about a pair it has seen."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS labels (key TEXT PRIMARY KEY, p REAL NOT NULL, label_version TEXT NOT NULL)"
        )

    @staticmethod
    def key(label_version: str, prompt: str, a: str, b: str) -> str:
        h = hashlib.sha256()
        for part in (label_version, prompt, a, b):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x1f")
        return h.hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                rows = self._db.execute(
                    f"SELECT key, p FROM labels WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                out.update(rows)
        return out

    def put_many(self, items: Sequence[tuple[str, float]], label_version: str) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO labels (key, p, label_version) VALUES (?, ?, ?)",
                [(k, float(p), label_version) for k, p in items],
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass
class LabelOutcome:
    p: np.ndarray  # P(a > b), combined over both orders when asked in both
    p_forward: np.ndarray  # asked as (a, b)
    p_backward: np.ndarray | None  # P(a > b) from the (b, a) question, i.e. 1 - P(b > a)
    cache_hits: int
    judged: int
    seconds: float

    @property
    def position_consistency(self) -> float | None:
        """Share of pairs with the same winner in both orders."""
        if self.p_backward is None:
            return None
        return float(np.mean((self.p_forward > 0.5) == (self.p_backward > 0.5)))

    @property
    def pairs_per_s(self) -> float:
        return len(self.p) / self.seconds if self.seconds > 0 else float("inf")


Progress = Callable[[int, int], None]  # (done, total)


def _cached_prefer(
    judge: Judge,
    prompts,
    a,
    b,
    cache: LabelCache | None,
    batch_size: int,
    progress: Progress | None,
    done_offset: int,
    total: int,
) -> tuple[np.ndarray, int]:
    n = len(prompts)
    keys = [LabelCache.key(judge.label_version, p, x, y) for p, x, y in zip(prompts, a, b)]
    known = cache.get_many(keys) if cache is not None else {}
    p = np.array([known.get(k, np.nan) for k in keys], dtype=float)
    todo = np.flatnonzero(np.isnan(p))
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        got = judge.prefer([prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx])
        p[idx] = got
        if cache is not None:  # (an empty cache is falsy: it has a length)
            cache.put_many([(keys[i], v) for i, v in zip(idx, got)], judge.label_version)
        if progress:
            progress(done_offset + (n - len(todo)) + start + len(idx), total)
    return p, n - len(todo)


def label_pairs(
    judge: Judge,
    prompts: Sequence[str],
    a: Sequence[str],
    b: Sequence[str],
    *,
    cache: LabelCache | None = None,
    both_orders: bool | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> LabelOutcome:
    """P(a > b) for every pair. Order-sensitive judges are asked in both orders and the answers
    averaged, P = (P(a>b | a first) + 1 - P(b>a | b first)) / 2, which cancels position bias."""
    both = judge.order_sensitive if both_orders is None else both_orders
    total = len(prompts) * (2 if both else 1)
    t0 = time.perf_counter()
    forward, hits = _cached_prefer(judge, prompts, a, b, cache, batch_size, progress, 0, total)
    backward = None
    if both:
        reverse, hits_b = _cached_prefer(
            judge, prompts, b, a, cache, batch_size, progress, len(prompts), total
        )
        backward = 1.0 - reverse
        hits += hits_b
    p = forward if backward is None else (forward + backward) / 2
    return LabelOutcome(
        p=p,
        p_forward=forward,
        p_backward=backward,
        cache_hits=hits,
        judged=total - hits,
        seconds=time.perf_counter() - t0,
    )


def agreement_report(p_ai: np.ndarray, p_human: np.ndarray, n_bins: int = 10) -> dict:
    """How AI labels agree with human ones (p_human is the human P(a > b), 1.0 for a hard label).

    Every other pair is presented flipped (a and b swapped in both labels): when a is always the
    human's choice, kappa would otherwise be 0 by construction and calibration one-sided."""
    flip = np.arange(len(p_ai)) % 2 == 1
    p_ai = np.where(flip, 1.0 - np.asarray(p_ai, float), p_ai)
    p_human = np.where(flip, 1.0 - np.asarray(p_human, float), p_human)
    human_prefers_a = p_human > 0.5
    ai_prefers_a = p_ai > 0.5
    return {
        "n_pairs": int(len(p_ai)),
        "accuracy": accuracy(p_ai, human_prefers_a),
        "cohen_kappa": cohen_kappa(ai_prefers_a, human_prefers_a),
        "ece": expected_calibration_error(p_ai, human_prefers_a, n_bins),
        "calibration": calibration_curve(p_ai, human_prefers_a, n_bins),
        "ai_prefers_human_choice_rate": float(np.mean(ai_prefers_a == human_prefers_a)),
        "mean_confidence": float(np.mean(np.abs(np.asarray(p_ai) - 0.5) * 2)),
    }
