"""The promotion gate: a new policy version becomes the champion only when it earns it."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_core.config import PromotionGateConfig
from rlhf_core.metrics import apply_checks


@dataclass
class Decision:
    promote: bool
    checks: list[dict]
    failures: list[str]

    @property
    def message(self) -> str:
        if self.promote:
            return "promoted to champion: " + "; ".join(
                f"{c['metric']} = {c['value']:.4f} {c['op']} {c['threshold']:g}"
                for c in self.checks
            )
        return "kept as challenger: " + "; ".join(self.failures)


def decide(metrics: dict, gate: PromotionGateConfig, champion: dict | None = None) -> Decision:
    """metrics: the evaluation's flat eval_* metrics; champion: {"version", "win_rate", "score_gain"} of
    the new policy against the current champion on the same prompts, or None when there is none."""
    checks = []
    if gate.min_win_rate is not None:
        checks.append(
            {
                "metric": "win_rate_vs_reference",
                "value": metrics["eval_win_rate"],
                "op": ">",
                "threshold": gate.min_win_rate,
                "config_key": "registry.gate.min_win_rate",
            }
        )
    if gate.min_win_rate_ci_low is not None:
        checks.append(
            {
                "metric": "win_rate_vs_reference_ci_low",
                "value": metrics["eval_win_rate_ci_low"],
                "op": ">",
                "threshold": gate.min_win_rate_ci_low,
                "config_key": "registry.gate.min_win_rate_ci_low",
            }
        )
    if gate.min_score_gain is not None:
        checks.append(
            {
                "metric": "score_gain_vs_reference",
                "value": metrics["eval_score_gain"],
                "op": ">",
                "threshold": gate.min_score_gain,
                "config_key": "registry.gate.min_score_gain",
            }
        )
    if gate.max_kl_per_response is not None:
        checks.append(
            {
                "metric": "kl_per_response",
                "value": metrics["eval_kl_per_response"],
                "op": "<=",
                "threshold": gate.max_kl_per_response,
                "config_key": "registry.gate.max_kl_per_response",
            }
        )
    if gate.max_unsafe_increase is not None and "eval_unsafe_rate_tuned" in metrics:
        checks.append(
            {
                "metric": "unsafe_rate_increase",
                "value": metrics["eval_unsafe_rate_tuned"] - metrics["eval_unsafe_rate_reference"],
                "op": "<=",
                "threshold": gate.max_unsafe_increase,
                "config_key": "registry.gate.max_unsafe_increase",
            }
        )
    if gate.safety_not_worse and "eval_safety_win_rate_ci_high" in metrics:
        checks.append(
            {
                "metric": "safety_win_rate_ci_high",
                "value": metrics["eval_safety_win_rate_ci_high"],
                "op": ">=",
                "threshold": 0.5,
                "config_key": "registry.gate.safety_not_worse",
            }
        )
    if gate.beat_champion and champion is not None:
        v = champion["version"]
        checks.append(
            {
                "metric": f"win_rate_vs_champion_v{v}",
                "value": champion["win_rate"],
                "op": ">",
                "threshold": 0.5,
                "config_key": "registry.gate.beat_champion",
            }
        )
        checks.append(
            {
                "metric": f"score_gain_vs_champion_v{v}",
                "value": champion["score_gain"],
                "op": ">",
                "threshold": 0.0,
                "config_key": "registry.gate.beat_champion",
            }
        )
    failures = apply_checks(checks)
    return Decision(not failures, checks, failures)
