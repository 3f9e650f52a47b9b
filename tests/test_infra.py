"""infra/: the production compose file is valid Compose and in step with `rlhf stack` (Docker cannot run here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.config import PROJECT_ROOT, StackConfig
from rlhf_core.stack import Stack

COMPOSE = PROJECT_ROOT / "infra" / "docker-compose.yml"
CHECK = Path(sys.executable).parent / "check-jsonschema"


def validate(path: Path) -> subprocess.CompletedProcess:
    """The compose-spec JSON schema vendored by check-jsonschema (offline)."""
    return subprocess.run(
        [str(CHECK), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_is_valid_compose():
    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_compose_file(tmp_path):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["mlflow"]["depends_on"] = {
        "postgres": {"condition": "when_it_feels_like_it"}
    }
    broken["services"]["worker"]["restart_policy"] = "always"  # not a compose key
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    result = validate(tmp_path / "compose.yml")
    assert result.returncode != 0 and "compose.yml" in result.stdout + result.stderr


def test_compose_and_the_local_stack_run_the_same_services(monkeypatch, tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    defaults = StackConfig()
    local = Stack(StackConfig(), tmp_path)._commands()
    assert set(local) == {"s3", "mlflow", "prefect", "worker"}
    assert set(services) == {
        "postgres",
        "seaweedfs",
        "mlflow",
        "prefect-server",
        "worker",
    }  # + Postgres for both servers

    # published on loopback only, by default
    loopback = "${RLHF_PUBLISH_HOST:-127.0.0.1}"
    assert services["seaweedfs"]["ports"] == [f"{loopback}:{defaults.s3_port}:8333"]
    assert (
        f"-s3.port={defaults.s3_port}" in local["s3"][0]
        and "mini" in services["seaweedfs"]["command"]
    )
    assert services["mlflow"]["ports"] == [f"{loopback}:{defaults.mlflow_port}:5000"]
    assert services["prefect-server"]["ports"] == [f"{loopback}:{defaults.prefect_port}:4200"]

    # both servers ask for credentials, and the worker has them
    for cmd in (services["mlflow"]["command"], local["mlflow"][0]):
        assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert "default_permission = NO_PERMISSIONS" in compose["configs"]["mlflow-auth"]["content"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in local["prefect"][1]
    for env in (services["worker"]["environment"], local["worker"][1]):
        assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD"} <= set(env)

    # MLflow: proxied artifacts to s3://<bucket>/mlflow, the server alone holding S3 credentials, one worker
    for cmd in (services["mlflow"]["command"], local["mlflow"][0]):
        assert "--serve-artifacts" in cmd and cmd[cmd.index("--workers") + 1] == "1"
        assert cmd[cmd.index("--artifacts-destination") + 1] in (
            "s3://${RLHF_BUCKET:-rlhf}/mlflow",
            f"s3://{defaults.bucket}/mlflow",
        )
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert local["mlflow"][1]["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{defaults.s3_port}"

    # the worker: a process pool of the same name, pointed at both servers
    for cmd in (services["worker"]["command"], local["worker"][0]):
        assert cmd[cmd.index("--type") + 1] == "process"
        assert cmd[cmd.index("--pool") + 1] in ("${RLHF_WORK_POOL:-rlhf}", defaults.work_pool)
    env = services["worker"]["environment"]
    assert (
        env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    )
    assert local["worker"][1]["PREFECT_API_URL"].endswith(f":{defaults.prefect_port}/api")
    # analytics off on both
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "--analytics-off" in local["prefect"][0]


def test_env_example_names_every_variable_the_compose_file_requires():
    text = COMPOSE.read_text()
    required = {line.split("${", 1)[1].split(":?")[0] for line in text.splitlines() if ":?" in line}
    example = {
        line.split("=", 1)[0]
        for line in (PROJECT_ROOT / "infra" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert required and required <= example


@pytest.mark.parametrize("name", ["gpu-template.patch.json"])
def test_kubernetes_gpu_template_patch_is_json_with_a_gpu_limit(name):
    import json

    patch = json.loads((PROJECT_ROOT / "infra" / "kubernetes" / name).read_text())
    container = patch["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert patch["variables"]["properties"]["gpu_count"]["default"] == 1


def test_the_ray_cluster_and_its_work_pool_share_the_work_dir_volume():
    import json

    import yaml

    docs = list(yaml.safe_load_all((PROJECT_ROOT / "infra/kubernetes/raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    workers = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"], workers]
    for pod in pods:
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod["containers"][0]["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]
    patch = json.loads((PROJECT_ROOT / "infra/kubernetes/ray-template.patch.json").read_text())
    job = patch["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert job["containers"][0]["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]
    assert patch["variables"]["properties"]["shared_claim"]["default"] == claim["metadata"]["name"]
    assert patch["job_configuration"]["env"]["RAY_ADDRESS"] == "{{ ray_address }}"
    head_service = cluster["metadata"]["name"] + "-head-svc"  # KubeRay's name for it
    assert patch["variables"]["properties"]["ray_address"]["default"] == f"{head_service}:6379"


def test_each_server_gets_only_the_environment_it_needs(monkeypatch, tmp_path):
    """A shell's tokens stay with the shell: the S3 store, MLflow and the worker get the store's
    generated keys, the Prefect server neither those nor API keys, the worker what its pipeline
    runs read."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "aws-canary",
        "GITHUB_TOKEN": "gh-canary",
        "HF_TOKEN": "hf-canary",
        "OPENAI_API_KEY": "openai-canary",
        "PREFECT_API_KEY": "cloud-canary",  # would override the stack's auth string
        "RLHF_SHARED_DATA": "/data",
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    envs = {name: env for name, (_, env, _) in Stack(StackConfig(), tmp_path)._commands().items()}
    store_secret = Stack(StackConfig(), tmp_path).credentials()["AWS_SECRET_ACCESS_KEY"]
    for name, env in envs.items():  # the shell's cloud keys are not the store's either
        assert not {"gh-canary", "hf-canary", "cloud-canary", "aws-canary"} & set(env.values())
        assert env["PATH"] == os.environ["PATH"]
    assert (
        envs["s3"]["AWS_SECRET_ACCESS_KEY"]
        == envs["mlflow"]["AWS_SECRET_ACCESS_KEY"]
        == envs["worker"]["AWS_SECRET_ACCESS_KEY"]
        == store_secret
    )
    assert (
        "AWS_SECRET_ACCESS_KEY" not in envs["prefect"] and "OPENAI_API_KEY" not in envs["prefect"]
    )
    assert "OPENAI_API_KEY" not in envs["s3"] and "OPENAI_API_KEY" not in envs["mlflow"]
    worker = envs["worker"]
    assert worker["OPENAI_API_KEY"] == "openai-canary" and worker["RLHF_SHARED_DATA"] == "/data"
    assert worker["HF_HUB_OFFLINE"] == "1"


def test_stack_credentials_are_generated_once_and_kept_private(monkeypatch, tmp_path):
    from rlhf_core.errors import UserError

    stack = Stack(StackConfig(), tmp_path)
    creds = stack.credentials()
    assert stack.credentials_path.stat().st_mode & 0o777 == 0o600
    assert len(creds["AWS_SECRET_ACCESS_KEY"]) >= 32 and creds["AWS_ACCESS_KEY_ID"]
    assert creds == Stack(StackConfig(), tmp_path).credentials()  # the same at every `up`
    assert len(creds["MLFLOW_TRACKING_PASSWORD"]) >= 32
    user, secret = creds["PREFECT_API_AUTH_STRING"].split(":")
    assert user == "rlhf" and len(secret) >= 32
    envs = {name: env for name, (_, env, _) in stack._commands().items()}
    assert envs["prefect"]["PREFECT_SERVER_API_AUTH_STRING"] == creds["PREFECT_API_AUTH_STRING"]
    assert envs["mlflow"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == creds["MLFLOW_TRACKING_PASSWORD"]
    assert all(envs["worker"][k] == v for k, v in creds.items())
    assert (
        "PREFECT_API_AUTH_STRING" not in envs["s3"] and "MLFLOW_TRACKING_PASSWORD" not in envs["s3"]
    )
    stack.credentials_path.chmod(0o644)
    with pytest.raises(UserError, match=r"readable by others \(mode 644\): chmod 600 it"):
        stack.credentials()
