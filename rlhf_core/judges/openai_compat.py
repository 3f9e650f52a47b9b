"""An OpenAI-compatible endpoint as judge (vLLM, TGI, `transformers serve`, or a hosted API).

Uses the choice tokens' log-probabilities when the server returns them; otherwise a number of
sampled votes. Timeouts, retries with exponential backoff and full jitter, a concurrency limit
and a request-rate limit. The API key comes only from the environment and is never logged.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rlhf_core.config import JudgeConfig
from rlhf_core.errors import UserError
from rlhf_core.judges.base import Judge, judge_prompt
from rlhf_core.judges.constitution import Constitution
from rlhf_core.redaction import redact_url

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RateLimiter:
    """At most `rate` requests per second across threads (evenly spaced start times)."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.interval = 1.0 / rate if rate else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


def backoff_delays(retries: int, base: float, cap: float, rng: random.Random) -> list[float]:
    """Full jitter: attempt k waits uniform(0, min(cap, base * 2^k))."""
    return [rng.uniform(0, min(cap, base * 2**k)) for k in range(retries)]


class OpenAIJudge(Judge):
    judge_id = "openai"
    order_sensitive = True

    def __init__(
        self,
        constitution: Constitution,
        settings: JudgeConfig,
        seed: int = 0,
    ):
        s = settings
        if not s.base_url or not s.model:
            raise UserError("labels.judge: the openai judge needs base_url and model")
        super().__init__(constitution, s.principles, seed)
        base_url, model, api_key_env, timeout = s.base_url, s.model, s.api_key_env, s.timeout_s
        max_retries, backoff_base, backoff_cap = s.max_retries, s.backoff_base_s, s.backoff_cap_s
        concurrency, requests_per_second, votes = s.concurrency, s.requests_per_second, s.votes
        vote_temperature, use_logprobs = s.vote_temperature, s.use_logprobs
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(
            timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=concurrency)
        )
        self.max_retries, self.backoff_base, self.backoff_cap = (
            max_retries,
            backoff_base,
            backoff_cap,
        )
        self.concurrency = concurrency
        self.limiter = RateLimiter(requests_per_second)
        self.votes, self.vote_temperature, self.use_logprobs, self.seed = (
            votes,
            vote_temperature,
            use_logprobs,
            seed,
        )
        self._server_gives_logprobs: bool | None = None if use_logprobs else False
        self._stats_lock = threading.Lock()
        # no key in here: versions are logged
        self.version = f"1:{redact_url(base_url)}:{model}:votes={votes}:t={vote_temperature}"

    # -- HTTP -------------------------------------------------------------------------------------
    def _post(self, body: dict) -> dict:
        import httpx

        rng = random.Random()  # jitter exists to de-synchronise clients: it need not repeat
        delays = backoff_delays(self.max_retries, self.backoff_base, self.backoff_cap, rng)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            try:
                with self._stats_lock:
                    self.stats.requests += 1
                resp = self.client.post(self.url, json=body)
                if resp.status_code == 200:
                    data = resp.json()
                    usage = data.get("usage") or {}
                    with self._stats_lock:
                        self.stats.prompt_tokens += usage.get("prompt_tokens", 0)
                        self.stats.completion_tokens += usage.get("completion_tokens", 0)
                    return data
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRY_STATUS:
                    break
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            with self._stats_lock:
                self.stats.errors += 1
            if attempt < self.max_retries:
                with self._stats_lock:
                    self.stats.retries += 1
                time.sleep(delays[attempt])
        raise UserError(f"judge endpoint {self.url}: {last} (after {attempt + 1} attempts)")

    # -- one comparison ---------------------------------------------------------------------------
    def _from_logprobs(self, data: dict) -> float | None:
        try:
            top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            return None
        mass = {"A": 0.0, "B": 0.0}
        for entry in top:
            letter = entry.get("token", "").strip().upper()
            if letter in mass:
                mass[letter] += math.exp(entry["logprob"])
        total = mass["A"] + mass["B"]
        return mass["A"] / total if total > 0 else 0.5

    def _one(self, index: int, text: str) -> float:
        messages = [{"role": "user", "content": text}]
        if self._server_gives_logprobs is not False:
            data = self._post(
                {
                    "model": self.model,
                    "messages": messages,
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "logprobs": True,
                    "top_logprobs": 5,
                    "seed": self.seed,
                }
            )
            p = self._from_logprobs(data)
            if p is not None:
                self._server_gives_logprobs = True
                return p
            self._server_gives_logprobs = (
                False  # e.g. `transformers serve` ignores logprobs: vote instead
            )
        a = b = 0
        for k in range(self.votes):
            data = self._post(
                {
                    "model": self.model,
                    "messages": messages,
                    "max_tokens": 2,
                    "temperature": self.vote_temperature,
                    "seed": self.seed * 1000 + k,
                }
            )
            answer = (data["choices"][0]["message"].get("content") or "").strip().upper()[:1]
            a += answer == "A"
            b += answer == "B"
        return (a + 0.5) / (a + b + 1.0)  # smoothed; abstentions move nothing

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        texts = [
            judge_prompt(self.constitution, p, x, y, self.principles_for(p, x, y))
            for p, x, y in zip(prompts, a, b)
        ]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            out = list(pool.map(self._one, range(len(texts)), texts))
        self.stats.comparisons += len(texts)
        return np.array(out, dtype=float)
