"""Shared test fixtures: isolated Prefect/MLflow state, the real data beside the project, a real S3 server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings when first imported: isolate it before anything imports it.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY"] = "false"
os.environ["PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS"] = "false"
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_HOME / "results")
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# An exported tracking URI or S3 endpoint (say, from `rlhf stack up`) would redirect every test's pipeline
# run: each test's config names its own SQLite file under its work dir instead.
for _var in ("MLFLOW_TRACKING_URI", "RLHF_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
    os.environ.pop(_var, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("PREFECT_API_URL", None)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RLHF_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
HH_SAMPLE = SHARED_DATA / "hh-rlhf-harmless-base.sample.jsonl.gz"
SELF_INSTRUCT = SHARED_DATA / "self-instruct-seed-tasks.jsonl"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real data not found at {path} (set RLHF_SHARED_DATA to the folder with the shared data sets)"
        )
    return path


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    return _need(HH_SAMPLE)


@pytest.fixture(scope="session")
def self_instruct() -> Path:
    return _need(SELF_INSTRUCT)


@pytest.fixture(autouse=True)
def _own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to the whole process, and a config
    without a tracking URI reads it: without this, a test's runs (and its registry) would land
    in the store of the last flow an earlier test ran."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API (temporary database) for the whole session keeps flow tests fast."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback, with a bucket 'prefs'."""
    from rlhf_core.services import SeaweedS3

    server = SeaweedS3(
        tmp_path_factory.mktemp("seaweed"),
        access_key="rlhf-test",
        secret_key="rlhf-test-secret",
        buckets=["prefs"],
    ).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials as users pass them: through the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on 127.0.0.1 with two CPUs for Ray Train's workers."""
    import shutil

    from rlhf_core.services import RayHead

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's sockets live under it
    head = RayHead(temp, num_cpus=2).start()
    try:
        yield head.address
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from tests.helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("models"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tests.helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def demo_policy_and_reward(tiny_gpt2, tmp_path_factory):
    """A briefly fine-tuned tiny policy and a MiniLM reward model trained on the demo pairs (its own tokenizer)."""
    from rlhf_core.config import ModelConfig, RewardConfig, SFTConfig
    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.models.loading import load_causal_lm, save_model
    from rlhf_core.reward.trainer import train_reward
    from rlhf_core.sft import SFTTrainer, encode_examples
    from tests.helpers import FINE_TUNED, demo_frame, demo_rows

    root = tmp_path_factory.mktemp("ppo-learn")
    lm = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
    train, _ = encode_examples(
        [(r["prompt"], r["chosen"]) for r in demo_rows()[:500]], ChatFormat(lm.tokenizer), 128
    )
    SFTTrainer(
        lm.model,
        lm.tokenizer,
        train,
        [],
        SFTConfig(max_steps=150, batch_size=16, lr=3e-3),
        progress=False,
    ).train(resume=False)
    save_model(lm.model, lm.tokenizer, root / "sft")
    cfg = RewardConfig(
        **FINE_TUNED,
        max_steps=40,
        batch_size=16,
        lr=1e-4,
        max_length=128,
        device="cpu",
        norm_prompts=32,
        norm_max_new_tokens=24,
    )
    rm, _ = train_reward(
        demo_frame(0, 600),
        None,
        cfg,
        ModelConfig(),
        "minilm",
        policy_dir=str(root / "sft"),
        progress=False,
    )
    rm.save(root / "rm")
    return root / "sft", root / "rm"


# A chat template in the Human/Assistant form: the server needs one to turn messages into a prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}\n\n{{ 'Human' if m['role'] == 'user' else 'Assistant' }}: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}\n\nAssistant:{% endif %}"
)


@pytest.fixture(scope="session")
def served_model(tiny_gpt2, tmp_path_factory):
    """A real OpenAI-compatible server on loopback: `transformers serve` with the tiny GPT-2
    (a 256-token context); yields (base URL, model folder)."""
    import shutil
    import subprocess
    import sys
    import time

    from transformers import AutoTokenizer

    from rlhf_core.services import free_ports

    folder = tmp_path_factory.mktemp("served") / "judge-model"
    shutil.copytree(tiny_gpt2, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE  # the server needs one to turn messages into a prompt
    tok.save_pretrained(folder)
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    (port,) = free_ports(1)
    log = open(folder.parent / "serve.log", "wb")
    proc = subprocess.Popen(
        [
            exe,
            "serve",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"transformers serve exited: {(folder.parent / 'serve.log').read_text()[-2000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1", str(folder)
    proc.terminate()
    proc.wait(timeout=30)
