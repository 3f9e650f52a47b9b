"""The evaluation report: JSON for machines, flat metrics for the MLflow compare view, plots and
markdown for people."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_core.evaluation.baselines import length_controlled_win_rate, outcomes
from rlhf_core.evaluation.metrics import WinRate
from rlhf_core.evaluation.policy import PolicyResult
from rlhf_core.plots import best_of_n_plot, curves_plot, histogram_plot, win_rate_plot

POLICIES = ("tuned", "reference")
PER_POLICY = (
    "score_mean",
    "score_std",
    "raw_score_mean",
    "length_mean",
    "eos_rate",
    "distinct_1",
    "distinct_2",
    "repetition_rate",
    "duplicate_rate",
    "unsafe_rate",
    "perplexity",
)


def build_report(
    tuned: PolicyResult,
    reference: PolicyResult,
    win: WinRate,
    p_tuned_better: np.ndarray,
    kl: dict,
    n_samples: int = 10,
    safety_win: WinRate | None = None,
    best_of_n: list[dict] | None = None,
    tie_margin: float = 0.0,
) -> dict:
    t, r = tuned.held_out, reference.held_out
    identical = [a == b for a, b in zip(t.texts, r.texts)]
    lc = length_controlled_win_rate(
        outcomes(p_tuned_better, identical, tie_margin), t.lengths, r.lengths
    )
    report = {
        "n_prompts": len(t.prompts),
        "n_safety_prompts": len(tuned.safety.prompts) if tuned.safety else 0,
        "policies": {"tuned": tuned.summary(), "reference": reference.summary()},
        "win_rate": {**win.as_dict(), "length_controlled": lc},
        "kl": kl,
        "distributions": {
            "score": {"tuned": tuned.scores.tolist(), "reference": reference.scores.tolist()},
            "length": {"tuned": t.lengths.tolist(), "reference": r.lengths.tolist()},
        },
        "samples": [
            {
                "prompt": t.prompts[i],
                "reference": r.texts[i],
                "tuned": t.texts[i],
                "reference_score": float(reference.scores[i]),
                "tuned_score": float(tuned.scores[i]),
                "p_tuned_better": float(p_tuned_better[i]),
            }
            for i in range(min(n_samples, len(t.prompts)))
        ],
    }
    if best_of_n:
        report["best_of_n"] = best_of_n
    if safety_win is not None:
        report["safety_win_rate"] = safety_win.as_dict()
    if tuned.safety is not None:
        report["safety_samples"] = [
            {
                "prompt": tuned.safety.prompts[i],
                "reference": reference.safety.texts[i],
                "tuned": tuned.safety.texts[i],
                "reference_unsafe": bool(reference.unsafe[i]),
                "tuned_unsafe": bool(tuned.unsafe[i]),
            }
            for i in range(min(n_samples, len(tuned.safety.prompts)))
        ]
    report["metrics"] = headline_metrics(report)
    return report


def headline_metrics(report: dict) -> dict[str, float]:
    """Flat eval_* metrics with the same names every run, so MLflow's compare view lines runs up."""
    win, kl, pol = report["win_rate"], report["kl"], report["policies"]
    out = {
        "eval_win_rate": win["win_rate"],
        "eval_win_rate_ci_low": win["ci_low"],
        "eval_win_rate_ci_high": win["ci_high"],
        "eval_win_rate_length_controlled": win["length_controlled"],
        "eval_tie_rate": win["ties"] / max(win["n"], 1),
        "eval_score_gain": pol["tuned"]["score_mean"] - pol["reference"]["score_mean"],
        "eval_kl_per_token": kl["per_token"],
        "eval_kl_per_response": kl["per_response"],
    }
    if "safety_win_rate" in report:
        sw = report["safety_win_rate"]
        out.update(
            eval_safety_win_rate=sw["win_rate"],
            eval_safety_win_rate_ci_low=sw["ci_low"],
            eval_safety_win_rate_ci_high=sw["ci_high"],
        )
    for row in report.get("best_of_n", []):
        out[f"eval_best_of_{row['n']}_win_rate"] = row["win_rate"]
    for name in POLICIES:
        for key in PER_POLICY:
            if key in pol[name]:
                out[f"eval_{key}_{name}"] = pol[name][key]
    return out


def write_plots(
    report: dict, out_dir: Path, history: list[dict] | None = None, champion: dict | None = None
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = report["distributions"]
    paths = [
        histogram_plot(
            {"reference": dist["score"]["reference"], "tuned": dist["score"]["tuned"]},
            out_dir / "score_histogram.png",
            "Reward-model score on held-out prompts",
            "normalised score",
        ),
        histogram_plot(
            {"reference": dist["length"]["reference"], "tuned": dist["length"]["tuned"]},
            out_dir / "length_histogram.png",
            "Response length on held-out prompts",
            "tokens",
            bins=20,
        ),
    ]
    rows = {"tuned vs reference": report["win_rate"]}
    if champion:
        rows[f"tuned vs champion v{champion['version']}"] = champion["win"]
    paths.append(win_rate_plot(rows, out_dir / "win_rate.png"))
    if report.get("best_of_n"):
        tuned = {"kl": report["kl"]["per_response"], **report["win_rate"]}
        paths.append(best_of_n_plot(report["best_of_n"], tuned, out_dir / "best_of_n.png"))
    if history and any("kl" in h for h in history):  # PPO: by iteration
        paths.append(
            curves_plot(
                history, ["score", "kl", "entropy"], out_dir / "training_curves.png", "PPO training"
            )
        )
    elif history:  # DPO: by optimiser step
        keys = ["train_loss", "rewards_accuracy", "rewards_margin", "eval_rewards_accuracy"]
        paths.append(
            curves_plot(history, keys, out_dir / "training_curves.png", "DPO training", x="step")
        )
    return paths


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def markdown_report(
    report: dict,
    promotion: dict | None = None,
    run_link: str | None = None,
    plots: list[str] | None = None,
) -> str:
    """Headline table, decision and reasons, plots, and sample prompts with both responses."""
    m, pol, win = report["metrics"], report["policies"], report["win_rate"]
    lines = ["## Tuned policy vs. reference", ""]
    if run_link:
        lines += [f"MLflow run: {run_link}", ""]
    lines += [
        f"{report['n_prompts']} held-out prompts, same sampler and seed for both policies.",
        "",
        "| metric | reference | tuned |",
        "|---|---|---|",
    ]
    labels = {
        "score_mean": "reward-model score (mean)",
        "score_std": "score std",
        "length_mean": "response length (tokens)",
        "eos_rate": "EOS rate",
        "distinct_1": "distinct-1",
        "distinct_2": "distinct-2",
        "repetition_rate": "repetition rate",
        "duplicate_rate": "duplicate responses",
        "unsafe_rate": "unsafe rate (safety prompts)",
        "perplexity": "perplexity (val chosen)",
    }
    for key, label in labels.items():
        if key in pol["tuned"]:
            lines.append(f"| {label} | {pol['reference'][key]:.4g} | {pol['tuned'][key]:.4g} |")
    lines += [
        "",
        f"- **Win rate** of tuned vs. reference (judge, ties half): **{win['win_rate']:.3f}** "
        f"(95% CI {win['ci_low']:.3f}-{win['ci_high']:.3f}; {win['wins']} wins, {win['ties']} ties, {win['losses']} losses)",
        f"- **Length-controlled win rate** (at equal response length): "
        f"{win['length_controlled']:.3f}",
        f"- **Score gain**: {m['eval_score_gain']:+.4f} (normalised reward-model units)",
        f"- **KL(tuned ‖ reference)**: {m['eval_kl_per_token']:.4f} per token, {m['eval_kl_per_response']:.3f} per response",
    ]
    if "safety_win_rate" in report:
        sw = report["safety_win_rate"]
        lines.append(
            f"- **Safety prompts**, tuned vs. reference (judge): win rate {sw['win_rate']:.3f} (95% CI {sw['ci_low']:.3f}-"
            f"{sw['ci_high']:.3f}, {sw['n']} prompts); unsafe rate {pol['reference'].get('unsafe_rate', float('nan')):.3f} -> "
            f"{pol['tuned'].get('unsafe_rate', float('nan')):.3f}"
        )
    if report.get("best_of_n"):
        lines += [
            "",
            f"Best-of-n baseline: n reference samples, the reward model's favourite judged against the "
            f"reference's own answer ({report['n_prompts']} prompts at most), at KL log n - (n-1)/n.",
            "",
            "| policy | KL per response | judged win rate (95% CI) | score gain |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| best-of-{b['n']} | {b['kl']:.3f} | {b['win_rate']:.3f} ({b['ci_low']:.3f}-{b['ci_high']:.3f}) "
            f"| {b['score_gain']:+.3f} |"
            for b in report["best_of_n"]
        ]
        lines.append(
            f"| **tuned** | {m['eval_kl_per_response']:.3f} | {win['win_rate']:.3f} "
            f"({win['ci_low']:.3f}-{win['ci_high']:.3f}) | {m['eval_score_gain']:+.3f} |"
        )
    if promotion:
        champ = promotion.get("champion")
        if champ:
            w = champ["win"]
            lines.append(
                f"- **vs. champion v{champ['version']}**: win rate {w['win_rate']:.3f} (95% CI {w['ci_low']:.3f}-{w['ci_high']:.3f}), "
                f"score gain {champ['score_gain']:+.4f}"
            )
        lines += [
            "",
            f"### Registry: {promotion['model_name']} v{promotion['version']} — "
            f"{'**champion**' if promotion['promoted'] else 'challenger (not promoted)'}",
            "",
        ]
        lines += [
            f"- {c['metric']} = {c['value']:.4f} {c['op']} {c['threshold']:g}: {'ok' if c['passed'] else '**fail**'} "
            f"(`{c['config_key']}`)"
            for c in promotion["checks"]
        ]
        if promotion.get("note"):
            lines.append(f"- {promotion['note']}")
    if plots:
        lines += ["", "### Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += [
        "",
        "### Samples",
        "",
        "| prompt | reference | score | tuned | score | P(tuned better) |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["samples"]:
        lines.append(
            f"| {_cell(s['prompt'], 100)} | {_cell(s['reference'])} | {s['reference_score']:+.2f} | {_cell(s['tuned'])} | "
            f"{s['tuned_score']:+.2f} | {s['p_tuned_better']:.2f} |"
        )
    if report.get("safety_samples"):
        lines += [
            "",
            "### Safety prompts",
            "",
            "| prompt | reference | unsafe | tuned | unsafe |",
            "|---|---|---|---|---|",
        ]
        for s in report["safety_samples"]:
            lines.append(
                f"| {_cell(s['prompt'], 100)} | {_cell(s['reference'])} | {'yes' if s['reference_unsafe'] else 'no'} | "
                f"{_cell(s['tuned'])} | {'yes' if s['tuned_unsafe'] else 'no'} |"
            )
    return "\n".join(lines)
