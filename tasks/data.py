"""Data stages: demo data, ingest, validate, split."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import rlhf_core.data.dataset
import rlhf_core.data.demo
import rlhf_core.data.formats
import rlhf_core.data.readers
import rlhf_core.data.validate
import rlhf_core.storage
from rlhf_core.config import DataConfig, DemoDataConfig, S3Config, SourceConfig, SplitRatios
from rlhf_core.data import dataset as data_pipeline
from rlhf_core.data.demo import write_demo
from tasks.results import DemoData, Ingested, Splits, Validated
from tasks.stage import StageContext, stage

DEMO_CODE = (  # the tables the generator reads
    *sorted((Path(rlhf_core.data.demo.__file__).parent / "demo_tables").glob("*.json")),
)
MLFLOW_DATASET_MAX_ROWS = (
    200_000  # above this, log the dataset's identity and schema without loading it
)

# MLflow's hints about int columns in inferred schemas and about local paths as dataset sources are noise here.
warnings.filterwarnings(
    "ignore", message="Hint: Inferred schema contains integer", category=UserWarning
)
warnings.filterwarnings(
    "ignore", message="The specified dataset source can be interpreted", category=UserWarning
)


@stage("demo-data", code=DEMO_CODE, folder="demo")
def demo_data(ctx: StageContext, demo: DemoDataConfig) -> DemoData:
    """The project's own seeded preference set, with held-out prompts on topics never trained on."""
    paths = write_demo(
        ctx.out_dir, n_prompts=demo.n_prompts, n_heldout=demo.n_heldout, seed=demo.seed
    )
    mlflow.log_params({"n_prompts": demo.n_prompts, "n_heldout": demo.n_heldout, "seed": demo.seed})
    return ctx.result(
        DemoData,
        preferences=str(paths["preferences"]),
        heldout_prompts=str(paths["heldout_prompts"]),
        metrics={"n_prompts": demo.n_prompts},
    )


@stage("ingest")
def ingest(
    ctx: StageContext, sources: list[SourceConfig], chunk_rows: int, s3: S3Config
) -> Ingested:
    """Every source read and normalised to one table; unparseable records kept with reasons."""
    report = data_pipeline.ingest_sources(
        sources, ctx.out_dir, chunk_rows=chunk_rows, s3=s3, cache_dir=ctx.work_dir / "s3-cache"
    )
    metrics = {
        k: report[k] for k in ("records", "pairs", "ingest_failures", "blank_lines", "ties_skipped")
    }
    mlflow.log_metrics(metrics)
    mlflow.log_params(
        {
            "sources": json.dumps([s.path for s in sources]),
            "formats": json.dumps([s["format"] for s in report["sources"]]),
        }
    )
    mlflow.log_artifact(str(ctx.out_dir / data_pipeline.REPORT_FILE), "ingest")
    return ctx.result(
        Ingested, metrics=metrics, summary_files=[str(ctx.out_dir / data_pipeline.REPORT_FILE)]
    )


def _report_tables(report: dict) -> tuple[list[dict], str]:
    rows = [{"reason": r, "rows": n} for r, n in report["reasons"].items()] or [
        {"reason": "(none)", "rows": 0}
    ]
    lengths = report["lengths_chars"]
    md = "\n".join(
        [
            f"### Validation {'passed' if report['passed'] else 'FAILED'}",
            f"- records read: {report['records']}, pairs: {report['pairs_normalised']}",
            f"- valid: **{report['valid']}**, quarantined: **{report['quarantined']}** "
            f"({report['invalid_fraction']:.2%}; limit {report['max_invalid_fraction']:.2%})",
            f"- dataset version: `{report['dataset_version']}`",
            "",
            "| field | mean chars | p50 | p95 | max |",
            "|---|---|---|---|---|",
            *[
                f"| {c} | {s['mean']} | {s['p50']} | {s['p95']} | {s['max']} |"
                for c, s in lengths.items()
            ],
        ]
    )
    return rows, md


@stage("validate", ignore={"data": {"sources", "splits", "demo", "chunk_rows"}})
def validate(ctx: StageContext, ingested: Ingested, data: DataConfig) -> Validated:
    """pandera rules; bad rows quarantined with their reasons, never dropped."""
    out = ctx.out_dir
    report = data_pipeline.validate_normalised(Path(ingested.out_dir), out, data, enforce=False)
    metrics = {
        k: report[k]
        for k in (
            "records",
            "valid",
            "quarantined",
            "quarantined_at_ingest",
            "quarantined_at_validation",
            "invalid_fraction",
        )
    }
    mlflow.log_metrics(metrics)
    mlflow.log_metrics(
        {f"quarantine_reason/{_metric_name(r)}": n for r, n in report["reasons"].items()}
    )
    mlflow.set_tag("rlhf.dataset_version", report["dataset_version"])
    mlflow.log_artifact(str(out / data_pipeline.REPORT_FILE), "validation")
    mlflow.log_artifact(str(out / data_pipeline.QUARANTINE_FILE), "validation")
    rows, md = _report_tables(report)
    create_table_artifact(
        table=rows, key="validation-reasons", description="Quarantined rows by reason"
    )
    create_markdown_artifact(markdown=md, key="validation-report", description="Validation summary")
    if not report["passed"]:
        mlflow.set_tag("rlhf.failure", "too many invalid rows")
        raise data_pipeline.gate_error(report, out)
    return ctx.result(
        Validated,
        metrics=metrics,
        dataset_version=report["dataset_version"],
        summary_files=[str(out / data_pipeline.REPORT_FILE)],
    )


def _metric_name(reason: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in reason).strip()[:200]


def log_splits_to_run(run_id: str, splits: Splits) -> None:
    """Attach the dataset splits to a run (the pipeline's parent run), cached or not."""
    inputs = [
        DatasetInput(
            _mlflow_dataset(
                Path(path), splits.dataset_version, f"preferences-{s}"
            )._to_mlflow_entity(),
            tags=[InputTag("mlflow.data.context", s)],
        )
        for s, path in splits.files.items()
    ]
    mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)


def _mlflow_dataset(path: Path, version: str, name: str):
    source = str(path)
    n_rows = _parquet_rows(path)
    if n_rows <= MLFLOW_DATASET_MAX_ROWS:
        return mlflow.data.from_pandas(
            pd.read_parquet(path), source=source, name=name, digest=version
        )
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.utils import _infer_schema

    return MetaDataset(
        source=mlflow.data.dataset_source_registry.resolve_dataset_source(source),
        name=name,
        digest=version,
        schema=_infer_schema(pd.read_parquet(path).head(100)),
    )


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@stage("split", folder="datasets")
def split(ctx: StageContext, validated: Validated, ratios: SplitRatios, seed: int) -> Splits:
    """Train/val/test by prompt (no prompt in two splits): the versioned dataset."""
    out = ctx.out_dir
    manifest = data_pipeline.make_splits(Path(validated.out_dir), out, ratios, seed)
    version = manifest["dataset_version"]
    metrics = {f"rows_{s}": n for s, n in manifest["counts"].items()}
    mlflow.log_metrics(metrics)
    mlflow.set_tag("rlhf.dataset_version", version)
    mlflow.log_artifact(str(out / "manifest.json"), "dataset")
    for s in data_pipeline.SPLITS:
        mlflow.log_input(
            _mlflow_dataset(out / f"{s}.parquet", version, f"preferences-{s}"), context=s
        )
    return ctx.result(
        Splits,
        metrics=metrics,
        dataset_version=version,
        summary_files=[str(out / "manifest.json")],
        **{s: str(out / f"{s}.parquet") for s in data_pipeline.SPLITS},
    )
