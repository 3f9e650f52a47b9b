"""`rlhf`: run the pipeline and work with preference data from the command line.

User mistakes (bad path, config or data) print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlhf_core.config import SourceConfig, load_config
from rlhf_core.errors import UnusableInputError, UserError

app = typer.Typer(help="RLHF pipeline: preference data in, aligned model out.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Ingest, validate and generate preference data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: configs/default.yaml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: section.key=value (repeatable).")]


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

    configure_environment(cfg)
    from flows.pipeline import rlhf_pipeline  # imports Prefect only after its environment is set

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
        table.add_row("AI label agreement", f"{result['labels']['agreement_accuracy']:.1%} with human labels")
    table.add_row("MLflow parent run", result["mlflow_run_id"])
    table.add_row("MLflow tracking", cfg.mlflow_tracking_uri)
    out.print(table)


def _progress(disabled: bool) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,.0f} records"),
                    TimeElapsedColumn(), console=err, transient=True,
                    disable=disabled)


@data_app.command("validate")
@user_errors()
def data_validate(
    path: Annotated[str, typer.Argument(help="File (.jsonl/.json/.csv/.parquet, optionally .gz), datasets folder, or s3://bucket/key.")],
    format: Annotated[str, typer.Option("--format", help="auto|pairwise|hh|ranked|comparison")] = "auto",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where valid.parquet, quarantine.jsonl and report.json go.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ingest and validate one source. Exit 0: within max_invalid_fraction; 1: over it; 2: unusable input."""
    from rlhf_core.data.pipeline import QUARANTINE_FILE, REPORT_FILE, VALID_FILE, ingest_sources, validate_normalised

    cfg = load_config(config, set_ or [])
    try:
        source = SourceConfig(path=path, format=format)
    except ValueError:
        raise UserError(f"--format {format!r}: expected one of auto, pairwise, hh, ranked, comparison") from None
    out_dir = out_dir or cfg.work_dir / "validate" / Path(path.rstrip("/")).name.split(".")[0]
    if not path.startswith(("s3://", "hf://")) and not Path(path).exists():
        raise UnusableInputError(f"{path}: no such file")
    with _progress(as_json) as progress, tempfile.TemporaryDirectory(prefix="rlhf-ingest-") as tmp:
        job = progress.add_task(f"ingest {path}", total=None)
        ingest_sources([source], Path(tmp) / "ingest", chunk_rows=cfg.data.chunk_rows, s3=cfg.s3,
                       cache_dir=cfg.work_dir / "s3-cache", progress=lambda n: progress.advance(job, n))
        progress.update(job, description="validate", completed=0)
        report = validate_normalised(Path(tmp) / "ingest", out_dir, cfg.data, enforce=False,
                                     progress=lambda n: progress.advance(job, n))
    report["outputs"] = {"valid": str(out_dir / VALID_FILE), "quarantine": str(out_dir / QUARANTINE_FILE),
                         "report": str(out_dir / REPORT_FILE)}
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_report(report)
    raise typer.Exit(0 if report["passed"] else 1)


def _print_report(report: dict) -> None:
    verdict = "[green]passed[/]" if report["passed"] else "[bold red]FAILED[/]"
    out.print(f"Validation {verdict}: {report['valid']:,} valid, {report['quarantined']:,} quarantined "
              f"({report['invalid_fraction']:.2%} invalid; limit {report['max_invalid_fraction']:.2%}) "
              f"from {report['records']:,} records. Dataset version {report['dataset_version']}.", highlight=False)
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
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for preferences.jsonl and heldout_prompts.jsonl.")],
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
