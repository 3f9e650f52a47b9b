"""`rlhf`: run the pipeline and work with preference data from the command line.

User mistakes (bad path, config or data) print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlhf_core.config import ON_POLICY_TITLES, SourceConfig, load_config
from rlhf_core.errors import UnusableInputError, UserError
from rlhf_core.redaction import redact_url

app = typer.Typer(
    help="RLHF pipeline: preference data in, aligned model out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Ingest, validate and generate preference data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
reward_app = typer.Typer(help="Train and evaluate reward models.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
stack_app = typer.Typer(
    help="The real servers on this machine, no Docker: S3 store, MLflow, Prefect server and worker.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # a one-line message stays one line when piped

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: configs/default.yaml).")
]
# the reward commands train on the user's data: the settings' own defaults, not the demo's choices
DataConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML config (default: none, the defaults of docs/config.md)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable)."),
]


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(code: int = 2):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as exc:
                fail(str(exc), code)

        return wrapper

    return deco


@app.command()
@user_errors()
def run(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the pipeline flow (Prefect; everything tracked in MLflow)."""
    cfg = load_config(config, set_ or [])
    from flows.runtime import configure_environment
    from rlhf_core.storage import work_dir_lock

    with work_dir_lock(cfg.work_dir, f"rlhf run ({cfg.run.name})"):  # before Prefect's home in it
        configure_environment(cfg)
        from flows.pipeline import rlhf_pipeline  # imports Prefect after its environment is set

        state = rlhf_pipeline(config=cfg.model_dump(mode="json"), return_state=True)
    if not state.is_completed():
        fail(state.message or "pipeline failed", 1)
    result = state.result()
    table = Table(title="rlhf run", show_header=False)
    table.add_row("dataset version", result["dataset_version"])
    for k, v in result["counts"].items():
        table.add_row(k, f"{v:g}" if isinstance(v, float) else str(v))
    if "reference_policy" in result:
        table.add_row("reference policy", result["reference_policy"])
    if "labels" in result and "agreement_accuracy" in result["labels"]:
        table.add_row(
            "AI label agreement", f"{result['labels']['agreement_accuracy']:.1%} with human labels"
        )
    if "reward" in result:
        r = result["reward"]
        table.add_row("reward model", result["reward_model"])
        table.add_row(
            "reward test accuracy",
            f"{r['test_accuracy']:.1%} (AUC {r['test_auc']:.3f}, ECE {r['test_ece']:.3f})",
        )
    for method, title in ON_POLICY_TITLES.items():
        if method in result:
            p = result[method]
            table.add_row("tuned policy", result["tuned_policy"])
            table.add_row(
                f"{title} reward",
                f"{p['score_start']:+.3f} -> {p['score_end']:+.3f} (KL {p['kl_end']:.2f})",
            )
    if "dpo" in result:
        d = result["dpo"]
        table.add_row("tuned policy", result["tuned_policy"])
        table.add_row(
            "DPO validation",
            f"loss {d.get('best_eval_loss', float('nan')):.4f}, implicit-reward accuracy "
            f"{d.get('best_eval_rewards_accuracy', float('nan')):.1%}",
        )
    if "evaluation" in result:
        e = result["evaluation"]
        table.add_row(
            "held-out win rate",
            f"{e['eval_win_rate']:.1%} (95% CI {e['eval_win_rate_ci_low']:.1%}-{e['eval_win_rate_ci_high']:.1%})",
        )
        table.add_row(
            "held-out score",
            f"{e['eval_score_mean_reference']:+.3f} -> {e['eval_score_mean_tuned']:+.3f} "
            f"(KL {e['eval_kl_per_response']:.2f} per response)",
        )
    if result.get("registry"):
        g = result["registry"]
        table.add_row(
            "registered",
            f"{g['model_name']} v{g['version']} [{', '.join(g.get('aliases') or []) or 'no alias'}]",
        )
        table.add_row("promotion", g.get("note") or g.get("message", ""))
    table.add_row("MLflow parent run", result["mlflow_run_id"])
    table.add_row("MLflow tracking", redact_url(cfg.mlflow_tracking_uri))
    out.print(table)


def _progress(disabled: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,.0f} records"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=disabled,
    )


@data_app.command("validate")
@user_errors()
def data_validate(
    path: Annotated[
        str,
        typer.Argument(
            help="File (.jsonl/.json/.csv/.parquet, optionally .gz), datasets folder, or s3://bucket/key."
        ),
    ],
    format: Annotated[
        str, typer.Option("--format", help="auto|pairwise|hh|ranked|comparison")
    ] = "auto",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Where valid.parquet, quarantine.jsonl and report.json go."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ingest and validate one source. Exit 0: within max_invalid_fraction; 1: over it; 2: unusable input."""
    from rlhf_core.data.dataset import (
        QUARANTINE_FILE,
        REPORT_FILE,
        VALID_FILE,
        ingest_sources,
        validate_normalised,
    )

    cfg = load_config(config, set_ or [])
    try:
        source = SourceConfig(path=path, format=format)
    except ValueError:
        raise UserError(
            f"--format {format!r}: expected one of auto, pairwise, hh, ranked, comparison"
        ) from None
    out_dir = out_dir or cfg.work_dir / "validate" / Path(path.rstrip("/")).name.split(".")[0]
    if not path.startswith(("s3://", "hf://")) and not Path(path).exists():
        raise UnusableInputError(f"{path}: no such file")
    with _progress(as_json) as progress, tempfile.TemporaryDirectory(prefix="rlhf-ingest-") as tmp:
        job = progress.add_task(f"ingest {path}", total=None)
        ingest_sources(
            [source],
            Path(tmp) / "ingest",
            chunk_rows=cfg.data.chunk_rows,
            s3=cfg.s3,
            cache_dir=cfg.work_dir / "s3-cache",
            progress=lambda n: progress.advance(job, n),
        )
        progress.update(job, description="validate", completed=0)
        report = validate_normalised(
            Path(tmp) / "ingest",
            out_dir,
            cfg.data,
            enforce=False,
            progress=lambda n: progress.advance(job, n),
        )
    report["outputs"] = {
        "valid": str(out_dir / VALID_FILE),
        "quarantine": str(out_dir / QUARANTINE_FILE),
        "report": str(out_dir / REPORT_FILE),
    }
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_report(report)
    raise typer.Exit(0 if report["passed"] else 1)


def _print_report(report: dict) -> None:
    verdict = "[green]passed[/]" if report["passed"] else "[bold red]FAILED[/]"
    out.print(
        f"Validation {verdict}: {report['valid']:,} valid, {report['quarantined']:,} quarantined "
        f"({report['invalid_fraction']:.2%} invalid; limit {report['max_invalid_fraction']:.2%}) "
        f"from {report['records']:,} records. Dataset version {report['dataset_version']}.",
        highlight=False,
    )
    if report["reasons"]:
        table = Table("reason", "rows", title="Quarantine reasons")
        for reason, n in report["reasons"].items():
            table.add_row(reason, f"{n:,}")
        out.print(table)
    for name, p in report["outputs"].items():
        out.print(f"  {name:>10}: {p}", highlight=False)


@data_app.command("demo")
@user_errors()
def data_demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for preferences.jsonl and heldout_prompts.jsonl.")
    ],
    n_prompts: Annotated[int, typer.Option(help="Number of preference pairs.")] = 3000,
    n_heldout: Annotated[int, typer.Option(help="Number of held-out prompts.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write the project's own synthetic demo preference set (deterministic from the seed)."""
    from rlhf_core.data.demo import write_demo

    if n_prompts < 1 or n_heldout < 1:
        raise UserError("--n-prompts and --n-heldout must be at least 1")
    try:
        paths = write_demo(out_dir, n_prompts=n_prompts, n_heldout=n_heldout, seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for name, p in paths.items():
        out.print(f"{name}: {p}", highlight=False)


DataArg = Annotated[
    str,
    typer.Option(
        "--data", help="Preference data: anything `rlhf data validate` accepts, or a split parquet."
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="auto|pairwise|hh|ranked|comparison")]


def _source_format(fmt: str) -> str:
    try:
        return SourceConfig(path="x", format=fmt).format
    except ValueError:
        raise UserError(
            f"--format {fmt!r}: expected one of auto, pairwise, hh, ranked, comparison"
        ) from None


@reward_app.command("train")
@user_errors()
def reward_train(
    data: DataArg,
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Folder for the trained reward model (written atomically)."),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Backbone: 'smollm2' or 'minilm' (packaged), a local HF folder, or a "
            "hub id (default: reward.backbone).",
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy", help="Reference policy folder: reward normalisation from its samples."
        ),
    ] = None,
    format: FormatOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the held-out metrics as one JSON object.")
    ] = False,
    config: DataConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a Bradley-Terry reward model on one preference source (split by prompt; reward.* keys apply)."""
    cfg = load_config(config, set_ or [], fallback=None)
    from rlhf_core.data.dataset import read_valid_pairs, split_by_prompt
    from rlhf_core.reward.evaluate import evaluate_reward_model
    from rlhf_core.reward.trainer import train_reward
    from rlhf_core.storage import atomic_dir

    frame, _ = read_valid_pairs(
        data, cfg.data, fmt=_source_format(format), s3=cfg.s3, cache_dir=cfg.work_dir / "s3-cache"
    )
    which = split_by_prompt(frame["prompt"], cfg.data.splits, cfg.run.seed)
    train, val, test = (frame[which == i].reset_index(drop=True) for i in range(3))
    checkpoints = out_dir.with_name(out_dir.name + ".checkpoints")  # a killed run resumes from here
    backbone = base or cfg.reward.backbone
    if backbone == "policy":
        if not policy:
            raise UserError("reward.backbone 'policy' needs --policy (the reference policy folder)")
        backbone = policy
    rm, results = train_reward(
        train,
        val,
        cfg.reward,
        cfg.model,
        backbone,
        checkpoint_dir=checkpoints,
        policy_dir=policy,
        seed=cfg.run.seed,
        progress=not as_json,
        distributed=cfg.distributed,
        on_line=lambda line: print(line, file=sys.stderr),
    )
    held_out = test if len(test) else val
    metrics = evaluate_reward_model(rm, held_out, "test").report if len(held_out) else {}
    with atomic_dir(out_dir) as staging:
        rm.save(staging)
    shutil.rmtree(checkpoints, ignore_errors=True)
    result = results[0]
    for r in results:
        if r.resume_note:
            err.print(f"note: {r.resume_note}", highlight=False)
        elif r.resumed_from_step:
            err.print(f"resumed from step {r.resumed_from_step}", highlight=False)
    summary = {
        "out": str(out_dir),
        "steps": sum(r.steps for r in results),
        "pairs_per_s": result.units_per_s,
        "best_val_accuracy": result.best_metric,
        "train_pairs": len(train),
        "members": len(results),
        "normalisation": rm.normalisation or [m.normalisation for m in getattr(rm, "members", [])],
        **{k: metrics[k] for k in ("accuracy", "auc", "ece", "n_pairs") if k in metrics},
    }
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        out.print(
            f"reward model saved to {out_dir}: {result.steps} steps, {result.units_per_s:.1f} pairs/s",
            highlight=False,
        )
        if metrics:
            out.print(
                f"held-out ({metrics['n_pairs']} pairs): accuracy {metrics['accuracy']:.3f}, AUC {metrics['auc']:.3f}, "
                f"ECE {metrics['ece']:.3f}",
                highlight=False,
            )


@reward_app.command("eval")
@user_errors()
def reward_eval(
    model_dir: Annotated[
        str,
        typer.Option(
            "--model",
            help="A reward model folder (ours, or any HF sequence classifier with one output).",
        ),
    ],
    data: DataArg,
    format: FormatOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the metrics as one JSON object.")
    ] = False,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Write the calibration and histogram PNGs here.")
    ] = None,
    config: DataConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pairwise accuracy, AUC, ECE, length bias of a reward model on every valid pair of a source."""
    cfg = load_config(config, set_ or [], fallback=None)
    from rlhf_core.data.dataset import read_valid_pairs
    from rlhf_core.reward.evaluate import evaluate_reward_model, write_plots
    from rlhf_core.reward.model import load_reward_model

    frame, _ = read_valid_pairs(
        data, cfg.data, fmt=_source_format(format), s3=cfg.s3, cache_dir=cfg.work_dir / "s3-cache"
    )
    rm = load_reward_model(model_dir, device=cfg.reward.device)
    ev = evaluate_reward_model(rm, frame, "data")
    if ev.report["n_pairs"] == 0:
        raise UserError(f"{data}: no labelled pairs to evaluate on")
    if plots:
        write_plots(ev, plots)
    r = ev.report
    summary = {
        "n_pairs": r["n_pairs"],
        "accuracy": r["accuracy"],
        "auc": r["auc"],
        "ece": r["ece"],
        "mean_reward_gap": r["mean_reward_gap"],
        "length_correlation": r["length"]["reward_length_correlation"],
        "longer_wins_accuracy": r["length"]["longer_wins_accuracy"],
        "length_flagged": r["length"]["flagged"],
        "by_label_source": r["by_label_source"],
        "by_length_bucket": r["by_length_bucket"],
    }
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    from rlhf_core.reward.evaluate import markdown_summary

    out.print(
        markdown_summary({"data": r}, None, title=f"Reward model {model_dir}"), highlight=False
    )


def main() -> None:
    app()


def _stack(config: Path | None, set_: list[str] | None):
    from rlhf_core.stack import Stack

    cfg = load_config(config, set_ or [])
    return Stack(cfg.stack, cfg.work_dir / "stack")


def _health_table(health: dict) -> bool:
    table = Table(title="rlhf stack")
    for col in ("service", "health", "url", "detail"):
        table.add_column(col)
    for name, (ok, url, detail) in health.items():
        table.add_row(name, "[green]healthy[/]" if ok else "[red]down[/]", url, detail)
    out.print(table)
    return all(ok for ok, _, _ in health.values())


@stack_app.command("up")
@user_errors()
def stack_up(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Start the S3 store, MLflow server, Prefect server and a process worker on 127.0.0.1; returns when all are healthy."""
    stack = _stack(config, set_)
    health = stack.up(echo=lambda line: err.print(line, highlight=False))
    _health_table(health)
    env = stack.s.client_env()
    out.print(
        "Use it from this shell (the last line reads the servers' credentials):\n"
        + "\n".join(f"  export {k}={v}" for k, v in env.items())
        + f"\n  set -a; . {stack.credentials_path}; set +a",
        highlight=False,
    )


@stack_app.command("down")
@user_errors()
def stack_down(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Stop what `rlhf stack up` started (by PID), nothing else."""
    stopped = _stack(config, set_).down(echo=lambda line: err.print(line, highlight=False))
    if not stopped:
        out.print("nothing to stop")


@stack_app.command("status")
@user_errors()
def stack_status(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Health and URL of each service; exit 0 only when all are healthy."""
    if not _health_table(_stack(config, set_).health()):
        raise typer.Exit(1)


@app.command("deploy")
@user_errors()
def deploy_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Apply the deployments to the running Prefect server: the pipeline (nightly, one run at a time) and, with
    deploy.watch_prefix, the S3 data sensor and the trigger that runs the pipeline on each new file."""
    cfg = load_config(config, set_ or [])
    from flows.runtime import configure_environment

    configure_environment(cfg)
    from flows.deploy import deploy

    result = deploy(cfg)
    p = result["pipeline"]
    out.print(
        f"deployment {p['name']} on work pool {p['work_pool']}: schedule {p['cron'] or 'none'} ({p['timezone']}), "
        f"at most {p['concurrency_limit']} run(s) at once",
        highlight=False,
    )
    if "sensor" in result:
        sn = result["sensor"]
        out.print(
            f"deployment {sn['name']}: every {sn['interval_s']}s lists {sn['prefix']} ({sn['already_there']} file(s) already there, "
            "not run); each new file starts a run of the pipeline on it",
            highlight=False,
        )


if __name__ == "__main__":
    main()
