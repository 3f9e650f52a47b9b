"""Multi-process training through Accelerate (DDP over gloo on CPU): two processes with the same
global batch train like one; a killed process fails the learner with one line, leaves no process
behind, and a rerun resumes from the last checkpoint."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_core.config import DistributedConfig, ModelConfig, SFTConfig
from rlhf_core.distributed.launch import launch, launch_command
from rlhf_core.errors import UserError
from tests.helpers import demo_frame

pytestmark = pytest.mark.slow

SETTINGS = dict(
    batch_size=8,
    grad_accum=2,
    lr=2e-3,
    eval_every=10,
    checkpoint_every=5,
    log_every=1,
    early_stopping_patience=None,
)


@pytest.fixture
def splits(tmp_path):
    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    demo_frame(0, 201).to_parquet(train)  # 201 = 25 x 8 + 1: one batch has a row for one process
    demo_frame(201, 241).to_parquet(val)
    return str(train), str(val)


def sft_job(model_dir, splits, tmp_path, tag: str, max_steps: int) -> dict:
    return {
        "base_model": str(model_dir),
        "train": splits[0],
        "val": splits[1],
        "model": ModelConfig(device="cpu").model_dump(mode="json"),
        "sft": SFTConfig(max_steps=max_steps, **SETTINGS).model_dump(mode="json"),
        "seed": 0,
        "checkpoint_dir": str(tmp_path / f"ckpt-{tag}"),
        "model_out": str(tmp_path / f"model-{tag}"),
    }


def test_two_processes_train_like_one(tiny_gpt2, splits, tmp_path):
    from rlhf_core.sft import build_sft_trainer

    steps = 20
    one: dict[int, dict] = {}
    trainer, _ = build_sft_trainer(
        str(tiny_gpt2),
        *splits,
        ModelConfig(device="cpu"),
        SFTConfig(max_steps=steps, **SETTINGS),
        0,
        on_log=lambda step, m: one.setdefault(step, {}).update(m),
        progress=False,
    )
    trainer.train(resume=False)
    single = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    two: dict[int, dict] = {}
    lines: list[str] = []
    out = launch(
        "sft",
        sft_job(tiny_gpt2, splits, tmp_path, "two", steps),
        tmp_path / "learner",
        DistributedConfig(num_processes=2),
        on_line=lines.append,
        on_log=lambda step, m: two.setdefault(step, {}).update(m),
    )
    assert out["world_size"] == 2 and out["result"]["steps"] == steps
    assert any("worker rank 1 pid" in line for line in lines)
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    for step in one:
        assert two[step]["train_loss"] == pytest.approx(one[step]["train_loss"], rel=1e-4), step
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-3), step
    assert two[20]["eval_loss"] == pytest.approx(one[20]["eval_loss"], rel=1e-4)
    assert two[1]["tokens_per_s"] > 0
    # rank 0 wrote the trained model: the same weights as one process's
    written = load_file(tmp_path / "model-two" / "model.safetensors")
    for name, tensor in written.items():
        # Adam moves each weight up to lr (2e-3) per step; summation order leaves ~3e-5 after 20
        torch.testing.assert_close(tensor, single[name], atol=1e-4, rtol=0, msg=name)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


def test_a_killed_rank_fails_with_one_line_leaves_nothing_and_resumes(tiny_gpt2, splits, tmp_path):
    job = sft_job(tiny_gpt2, splits, tmp_path, "kill", max_steps=24)
    pids: dict[int, int] = {}

    def on_line(line: str) -> None:
        if line.startswith("worker rank "):
            _, _, rank, _, pid = line.split()
            pids[int(rank)] = int(pid)

    def on_log(step: int, metrics: dict) -> None:
        if step == 12:  # checkpoints at 5 and 10 exist
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(UserError) as failure:
        launch(
            "sft",
            job,
            tmp_path / "learner",
            DistributedConfig(num_processes=2),
            on_line=on_line,
            on_log=on_log,
        )
    message = str(failure.value)
    assert message == "sft: rank 1 failed: killed by signal 9", message
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids.values() if _alive(p)], "a worker outlived the launch"

    out = launch(
        "sft",
        job,
        tmp_path / "learner",
        DistributedConfig(num_processes=2),
        on_line=lambda line: None,
        on_log=lambda step, m: None,
    )
    assert out["result"]["resumed_from_step"] == 10 and out["result"]["steps"] == 24


def test_sharded_engines_are_refused_on_cpu_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    for strategy in ("fsdp", "deepspeed"):
        with pytest.raises(UserError, match=f"distributed.strategy {strategy} needs GPUs"):
            launch_command(DistributedConfig(num_processes=2, strategy=strategy), tmp_path / "j")


def test_the_sft_stage_on_two_processes(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient

    from rlhf_core.models.loading import load_causal_lm
    from tests.test_flow import make_cfg, run_flow, stage_runs

    cfg = make_cfg(tmp_path, until="sft")
    cfg = cfg.model_copy(update={"distributed": DistributedConfig(num_processes=2)})
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    client = MlflowClient(cfg.mlflow_tracking_uri)
    sft = stage_runs(client, result["mlflow_run_id"])["sft"]
    assert sft.data.params["world_size"] == "2"
    history = client.get_metric_history(sft.info.run_id, "eval_loss")
    assert [m.step for m in history] == [6, 12] and sft.data.metrics["steps"] == 12
    assert {a.path for a in client.list_artifacts(sft.info.run_id)} >= {"model", "samples"}
    assert (
        load_causal_lm(result["reference_policy"], device="cpu").model.config.model_type == "gpt2"
    )
