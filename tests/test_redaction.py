"""Secrets stay out of logs and go only where they belong (issue: hardening, item 3)."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from rlhf_core.config import JudgeConfig, PipelineConfig, load_config
from rlhf_core.errors import UserError
from rlhf_core.redaction import check_endpoint, redact, redact_url


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "https://user:pw@mlflow.example.com:5000/api?token=abc#x",
            "https://mlflow.example.com:5000/api",
        ),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("s3://bucket/prefix/file.jsonl?versionId=3", "s3://bucket/prefix/file.jsonl"),
        ("http://key@[::1]:8333", "http://[::1]:8333"),
        ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
        ("plain words: a?b=c", "plain words: a?b=c"),
        ("/local/path?x", "/local/path?x"),
    ],
)
def test_redact_url_drops_user_info_query_and_fragment(url, expected):
    assert redact_url(url) == expected


def test_redact_walks_nested_settings():
    dumped = {"a": {"b": ["https://u:p@h/x?k=v", 3]}, "c": None, "d": "text"}
    assert redact(dumped) == {"a": {"b": ["https://h/x", 3]}, "c": None, "d": "text"}


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://judge.example.com/v1", "plain http to judge.example.com"),
        ("https://me:pw@judge.example.com/v1", "credentials do not belong in the URL"),
        ("ftp://127.0.0.1/v1", "is not an http(s) URL"),
    ],
)
def test_judge_endpoint_is_https_unless_local(url, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_endpoint(url)
    with pytest.raises(UserError, match=re.escape(message)):  # a config error: one line
        load_config(None, ["labels.judge.backend=openai", f"labels.judge.base_url={url}"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://localhost:8000/v1",
        "http://[::1]:8000/v1",
        "https://api.example.com/v1",
    ],
)
def test_judge_endpoint_accepts_https_and_loopback(url):
    assert JudgeConfig(base_url=url).base_url == url


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "PATH", "openai_api_key"])
def test_judge_key_variable_must_be_an_api_key(name):
    with pytest.raises(UserError, match="ending in _API_KEY"):
        load_config(None, [f"labels.judge.api_key_env={name}"])
    assert JudgeConfig(api_key_env="VLLM_API_KEY").api_key_env == "VLLM_API_KEY"


def test_logged_settings_carry_no_credentials(tmp_path):
    """What the pipeline's MLflow run records of the settings: params and resolved_config.yaml
    (a query that names no credential is allowed in the config, and still stripped where logged)."""
    from tasks.tracking import start_pipeline_run

    canary = "canary-7f3e"
    cfg = PipelineConfig.model_validate(
        {
            "run": {"work_dir": str(tmp_path / "w")},
            "tracking": {
                "mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                "prefect_api_url": f"https://prefect.example.com/api?tenant={canary}",
            },
            "s3": {"endpoint_url": f"http://minio.local:9000/?region={canary}"},
        }
    )
    ctx = start_pipeline_run(cfg, "redaction")
    client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
    run = client.get_run(ctx.parent_run_id)
    logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
    yaml_text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config/resolved_config.yaml")
    assert canary not in logged and canary not in yaml_text
    assert "https://prefect.example.com/api" in yaml_text  # the URL itself stays


def test_config_errors_do_not_echo_credentials():
    with pytest.raises(UserError) as err:
        load_config(None, ["labels.judge.base_url=https://me:canary-9d1@judge.example.com/v1"])
    assert "canary-9d1" not in str(err.value) and "labels.judge.base_url" in str(err.value)


@pytest.mark.parametrize(
    "setting",
    [
        "tracking.mlflow_tracking_uri=postgresql://mlflow:canary-5c@db.example.com/mlflow",
        "s3.endpoint_url=https://AKIA:canary-5c@s3.example.com",
        "tracking.prefect_api_url=https://u:canary-5c@prefect.example.com/api",
        "labels.judge.base_url=https://judge.example.com/v1?api_key=canary-5c",
        "s3.endpoint_url=https://s3.example.com/?X-Amz-Signature=canary-5c",
        "labels.judge.base_url=https://judge.example.com/v1?api-version=2024&sig=canary-5c",
        "labels.judge.base_url=https://judge.example.com/v1?apiKey=canary-5c",
        "s3.endpoint_url=https://s3.example.com/?accessToken=canary-5c",
    ],
)
def test_no_credentials_in_the_config(setting):
    """The config is logged and is the Prefect flow's parameter: a URL with user-info is refused
    with one line naming the key, without echoing the secret."""
    with pytest.raises(UserError) as err:
        load_config(None, [setting])
    msg = str(err.value)
    assert msg.startswith(setting.split("=")[0] + ": credentials do not belong in the config")
    assert "canary-5c" not in msg and "\n" not in msg


def test_a_plain_query_setting_is_not_a_credential():
    cfg = load_config(None, ["labels.judge.base_url=https://judge.example.com/v1?api-version=2024"])
    assert cfg.labels.judge.base_url.endswith("?api-version=2024")
