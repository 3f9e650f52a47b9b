"""The OpenAI-compatible judge against a real local server: `transformers serve` with a small
local model folder (it ignores `logprobs`, so the judge votes), plus retries and rate limiting."""

import numpy as np
import pytest

from rlhf_core.config import JudgeConfig
from rlhf_core.errors import UserError
from rlhf_core.judges.constitution import load_constitution
from rlhf_core.judges.labeling import LabelCache, label_pairs
from rlhf_core.judges.openai_compat import OpenAIJudge, RateLimiter, backoff_delays
from rlhf_core.services import free_ports


def short_constitution():
    """The tiny served model has a 256-token context: keep the judge's question short."""
    from rlhf_core.judges.constitution import Constitution, Principle

    return Constitution(
        intro="Pick the better reply.",
        principles=[Principle(name="helpful", text="Prefer the more helpful reply.")],
    )


PROMPTS = ["How do I boil an egg?", "What is rain?"]
A = ["Boil it for nine minutes.", "Water falling from clouds."]
B = ["No.", "Look it up yourself."]


def test_judges_through_a_real_server_by_votes(served_model, tmp_path, monkeypatch):
    url, model = served_model
    monkeypatch.setenv("RLHF_TEST_API_KEY", "sk-test-secret")
    settings = JudgeConfig(
        backend="openai",
        base_url=url,
        model=model,
        api_key_env="RLHF_TEST_API_KEY",
        votes=3,
        concurrency=2,
    )
    judge = OpenAIJudge(short_constitution(), settings, seed=7)
    p = judge.prefer(PROMPTS, A, B)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    assert (
        judge._server_gives_logprobs is False
    )  # transformers serve ignores logprobs: votes were used
    # 1 logprob probe + 3 votes for the first; the second may skip the probe
    assert 2 * 3 + 1 <= judge.stats.requests <= 2 * 4 and judge.stats.errors == 0
    assert judge.stats.prompt_tokens > 0 and judge.stats.completion_tokens > 0
    assert "sk-test-secret" not in judge.label_version  # versions are logged; keys never are
    # seeded sampling: the same question gives the same votes
    again = OpenAIJudge(short_constitution(), settings, seed=7)
    assert np.allclose(again.prefer(PROMPTS, A, B), p)
    # through the labeller: both orders, cached
    cache = LabelCache(tmp_path / "c.sqlite")
    first = label_pairs(judge, PROMPTS, A, B, cache=cache)
    assert first.p_backward is not None and first.position_consistency is not None
    requests = judge.stats.requests
    assert (
        label_pairs(judge, PROMPTS, A, B, cache=cache).judged == 0
        and judge.stats.requests == requests
    )


def test_unreachable_endpoint_fails_after_retries_with_one_line():
    (port,) = free_ports(1)  # nothing listens there
    judge = OpenAIJudge(
        load_constitution(),
        JudgeConfig(
            backend="openai",
            base_url=f"http://127.0.0.1:{port}/v1",
            model="m",
            max_retries=2,
            backoff_base_s=0.01,
            timeout_s=2,
        ),
    )
    with pytest.raises(UserError) as err:
        judge.prefer(PROMPTS[:1], A[:1], B[:1])
    assert "after 3 attempts" in str(err.value) and "\n" not in str(err.value)
    assert judge.stats.requests == 3 and judge.stats.retries == 2 and judge.stats.errors == 3


def test_backoff_is_exponential_with_full_jitter():
    import random

    delays = backoff_delays(6, base=0.5, cap=4.0, rng=random.Random(0))
    caps = [0.5, 1, 2, 4, 4, 4]
    assert all(0 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) == 6


def test_rate_limiter_spaces_requests():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.wait()
    assert slept == pytest.approx(
        [0.25, 0.25, 0.25, 0.25]
    )  # the first goes at once, then 4 per second
    assert RateLimiter(None).interval == 0
