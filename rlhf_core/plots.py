"""PNG plots for the reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def reliability_plot(
    curve: list[dict], path: Path, title: str = "Calibration", xlabel: str = "predicted P"
) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    pts = [(b["mean_predicted"], b["observed"], b["count"]) for b in curve if b["count"]]
    if pts:
        x, y, n = zip(*pts)
        ax.plot(x, y, "o-", label="observed")
        for xi, yi, ni in pts:
            ax.annotate(str(ni), (xi, yi), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel="observed frequency", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histogram_plot(
    series: dict[str, np.ndarray],
    path: Path,
    title: str,
    xlabel: str,
    bins: int = 30,
    value_range: tuple[float, float] | None = None,
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    finite = [v for v in (np.asarray(x, float) for x in series.values()) if len(v)]
    if value_range is None and finite:  # the same bins for every series, so the bars compare
        allv = np.concatenate(finite)
        allv = allv[np.isfinite(allv)]
        value_range = (
            (float(allv.min()), float(allv.max()))
            if len(allv) and allv.min() < allv.max()
            else None
        )
    for name, values in series.items():
        ax.hist(np.asarray(values, float), bins=bins, range=value_range, alpha=0.55, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_plot(
    history: list[dict], keys: list[str], path: Path, title: str, x: str = "iteration"
) -> Path:
    """One small panel per metric over training (score, KL, entropy, ...)."""
    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(
        1, max(1, len(keys)), figsize=(3.4 * max(1, len(keys)), 3.0), squeeze=False
    )
    for ax, key in zip(axes[0], keys):
        pts = [(h[x], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), lw=1.4)
        ax.set(title=key, xlabel=x)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def win_rate_plot(rows: dict[str, dict], path: Path, title: str = "Judged win rate") -> Path:
    """One bar per comparison (name -> {win_rate, ci_low, ci_high}) with its 95% interval; 0.5 = no better."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(6, 1.0 + 0.7 * len(names)))
    y = np.arange(len(names))
    rates = np.array([rows[n]["win_rate"] for n in names])
    err = np.array(
        [[r - rows[n]["ci_low"], rows[n]["ci_high"] - r] for n, r in zip(names, rates)]
    ).T
    ax.barh(
        y,
        rates,
        xerr=err,
        capsize=5,
        color=[
            "tab:green" if lo > 0.5 else "tab:grey" for lo in (rows[n]["ci_low"] for n in names)
        ],
    )
    ax.axvline(0.5, ls="--", color="black", lw=1)
    for yi, r in zip(y, rates):
        ax.annotate(f"{r:.2f}", (r, yi), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set(
        xlim=(0, 1),
        yticks=y,
        yticklabels=names,
        xlabel="win rate (ties count half), 95% CI",
        title=title,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gold_proxy_plot(checks: list[dict], path: Path, selected: int | None = None) -> Path:
    """Gao et al. (2022): judged win rate (gold) and reward-model score (proxy) against sqrt(KL)."""
    x = np.sqrt(np.maximum([c["val_kl"] for c in checks], 0.0))
    fig, gold = plt.subplots(figsize=(6, 3.8))
    gold.plot(x, [c["val_win_rate"] for c in checks], "o-", color="C0", label="judge win rate")
    gold.fill_between(
        x,
        [c["val_win_rate_ci_low"] for c in checks],
        [c["val_win_rate_ci_high"] for c in checks],
        color="C0",
        alpha=0.15,
    )
    gold.axhline(0.5, ls="--", color="grey", lw=1)
    gold.set(xlabel="sqrt(KL per response)", ylabel="judged win rate over reference (gold)")
    proxy = gold.twinx()
    proxy.plot(x, [c["val_score"] for c in checks], "s--", color="C1", label="reward model")
    proxy.set_ylabel("reward-model score (proxy)")
    for c, xi in zip(checks, x):
        if c["iteration"] == selected:
            gold.plot([xi], [c["val_win_rate"]], "*", ms=14, color="C3", label="kept")
    gold.legend(loc="upper left", fontsize=8)
    proxy.legend(loc="lower right", fontsize=8)
    gold.set_title("Judge (gold) vs reward model (proxy) on validation prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_of_n_plot(rows: list[dict], tuned: dict, path: Path) -> Path:
    """Judged win rate over the reference against KL: best-of-n (by the reward model) and the tuned policy."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    kl = [r["kl"] for r in rows]
    ax.errorbar(
        kl,
        [r["win_rate"] for r in rows],
        yerr=[
            [r["win_rate"] - r["ci_low"] for r in rows],
            [r["ci_high"] - r["win_rate"] for r in rows],
        ],
        fmt="o-",
        capsize=3,
        label="best-of-n (reference, reward model picks)",
    )
    for r in rows:
        ax.annotate(
            f"n={r['n']}",
            (r["kl"], r["win_rate"]),
            fontsize=7,
            xytext=(3, 4),
            textcoords="offset points",
        )
    ax.errorbar(
        [tuned["kl"]],
        [tuned["win_rate"]],
        yerr=[[tuned["win_rate"] - tuned["ci_low"]], [tuned["ci_high"] - tuned["win_rate"]]],
        fmt="*",
        ms=12,
        color="C3",
        capsize=3,
        label="tuned policy",
    )
    ax.axhline(0.5, ls="--", color="grey", lw=1)
    ax.set(
        xlabel="KL per response from the reference (nats)",
        ylabel="judged win rate",
        title="Tuned policy vs best-of-n at matched KL",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
