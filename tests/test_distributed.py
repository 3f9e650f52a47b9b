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

from rlhf_core.config import DistributedConfig, ModelConfig, RewardConfig, SFTConfig
from rlhf_core.distributed.launch import launch, launch_command
from rlhf_core.errors import UserError
from tests.helpers import FINE_TUNED, demo_frame

pytestmark = pytest.mark.slow

SETTINGS = dict(
    batch_size=8,
    grad_accum=2,
    lr=2e-3,
    eval_every=10,
    checkpoint_every=5,
    log_every=1,
    early_stopping_patience=None,
    mixed_precision="no",  # fp32: bf16 kernels round by batch layout, which the split changes
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


REWARD = dict(
    mixed_precision="no",  # fp32, as SFT's
    batch_size=8,
    grad_accum=2,
    lr=2e-4,  # at 1e-3 this tiny model's training is chaotic: float noise grows to 1e-2 by step 20
    max_length=64,
    eval_every=10,
    checkpoint_every=5,
    log_every=1,
    early_stopping_patience=None,
    norm_prompts=4,
    device="cpu",
)


def train_reward_on(n: int, cfg: RewardConfig, backbone, tmp_path, lines: list | None = None):
    """train_reward on n processes: (model, results, {step: metrics})."""
    from rlhf_core.reward.trainer import train_reward

    logged: dict[int, dict] = {}
    rm, results = train_reward(
        demo_frame(0, 201),
        demo_frame(201, 241),
        cfg,
        ModelConfig(device="cpu"),
        str(backbone),
        checkpoint_dir=tmp_path / f"ckpt-{n}",
        on_log=lambda step, m: logged.setdefault(step, {}).update(m),
        progress=False,
        distributed=DistributedConfig(num_processes=n),
        on_line=(lines if lines is not None else []).append,
    )
    return rm, results, logged


# mean pooling calls the backbone and the head itself, outside the model's own forward
@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_the_reward_model_on_two_processes_trains_like_one(tiny_gpt2, tmp_path, pooling):
    cfg = RewardConfig(max_steps=20, pooling=pooling, freeze_backbone=False, **REWARD)
    one, one_results, one_log = train_reward_on(1, cfg, tiny_gpt2, tmp_path)
    lines: list[str] = []
    two, two_results, two_log = train_reward_on(2, cfg, tiny_gpt2, tmp_path, lines)
    assert any("worker rank 1 pid" in line for line in lines)
    assert two_results[0].steps == 20 and sorted(two_log) == sorted(one_log)
    for step in one_log:
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            if key in one_log[step]:
                assert two_log[step][key] == pytest.approx(one_log[step][key], rel=1e-4), (
                    step,
                    key,
                )
        assert two_log[step]["grad_norm"] == pytest.approx(one_log[step]["grad_norm"], rel=1e-3)
    # the same function: Bradley-Terry sees reward differences only, so a shift every reward
    # shares (the final layer norm's bias, whose gradient is float noise that Adam turns into
    # lr-sized steps) may differ; the differences may not
    val = demo_frame(201, 241)
    scores = [
        (rm.score(val["prompt"], val["chosen"]), rm.score(val["prompt"], val["rejected"]))
        for rm in (one, two)
    ]
    torch.testing.assert_close(
        scores[1][0] - scores[1][1], scores[0][0] - scores[0][1], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(scores[1][0], scores[0][0], atol=1e-3, rtol=0)
    # the normalisation statistics are measured in the calling process, on the trained model
    assert two.normalisation["mean"] == pytest.approx(one.normalisation["mean"], abs=1e-3)


def test_the_reward_probe_on_two_processes_fits_the_same_head(tiny_gpt2, tmp_path):
    cfg = RewardConfig(freeze_backbone=True, pooling="mean", **REWARD)
    one, one_results, _ = train_reward_on(1, cfg, tiny_gpt2, tmp_path)
    two, two_results, _ = train_reward_on(2, cfg, tiny_gpt2, tmp_path)
    assert two_results[0].final_eval == pytest.approx(one_results[0].final_eval, rel=1e-4)
    for name, tensor in two.model.state_dict().items():
        torch.testing.assert_close(tensor, one.model.state_dict()[name], atol=1e-5, rtol=1e-4)


POLICY = dict(
    iterations=4,
    batch_size=8,
    mini_batch_size=4,
    micro_batch_size=2,
    generation_batch_size=4,  # two rollout chunks: one per process
    max_new_tokens=8,
    device="cpu",
    reference="adapter",
    lora={"enabled": True, "r": 4, "alpha": 8},
    lr=5e-3,
    checkpoint_every=2,
)
COMPARED = ("score", "kl", "policy_loss", "value_loss", "entropy", "grad_norm", "beta")


def policy_job(method, cfg, policy_dir, reward_dir, prompts, tmp_path, tag: str) -> dict:
    return {
        "section": method,
        "settings": cfg.model_dump(mode="json"),
        "policy_dir": str(policy_dir),
        "reward_dir": str(reward_dir),
        "prompts": prompts,
        "model": ModelConfig().model_dump(mode="json"),
        "seed": 0,
        "val_prompts": [],
        "checkpoint_dir": str(tmp_path / f"ckpt-{tag}"),
        "model_out": str(tmp_path / f"model-{tag}"),
    }


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ppo", {"value_model": "shared", "adaptive_kl": True}),  # GAE, whitening, KL control
        ("grpo", {"samples_per_prompt": 4}),  # group advantages, KL in the loss
    ],
)
def test_policy_optimisation_on_two_processes_matches_one(tiny_gpt2, tmp_path, method, extra):
    from rlhf_core.config import PipelineConfig
    from rlhf_core.ppo.build import build_ppo_trainer
    from tests.helpers import demo_rows, untrained_reward_dir

    section = PipelineConfig.model_fields[method].annotation
    cfg = section(**POLICY, **extra)
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    prompts = [r["prompt"] for r in demo_rows()[:40]]
    one: dict[int, dict] = {}
    trainer = build_ppo_trainer(
        str(tiny_gpt2),
        str(reward),
        prompts,
        cfg,
        ModelConfig(),
        on_log=lambda it, m: one.setdefault(it, {}).update(m),
        progress=False,
    )
    trainer.train()

    two: dict[int, dict] = {}
    samples: list[int] = []
    out = launch(
        "policy",
        policy_job(method, cfg, tiny_gpt2, reward, prompts, tmp_path, "two"),
        tmp_path / "learner",
        DistributedConfig(num_processes=2),
        on_line=lambda line: None,
        on_log=lambda it, m: two.setdefault(it, {}).update(m),
        on_samples=lambda it, rows: samples.append(it),
    )
    assert out["world_size"] == 2 and out["result"]["iterations"] == 4
    assert sorted(two) == sorted(one) == [1, 2, 3, 4] and samples
    for it in one:
        for key in COMPARED:
            if key in one[it]:
                assert two[it][key] == pytest.approx(one[it][key], rel=1e-3, abs=1e-5), (it, key)
    assert_same_policy(tmp_path / "model-two", trainer)


def assert_same_policy(model_dir: Path, trainer) -> None:
    """The learner's written policy holds the in-process trainer's merged weights."""
    written = load_file(model_dir / "model.safetensors")
    for name, tensor in trainer.policy.merge_and_unload().state_dict().items():
        if name in written:
            torch.testing.assert_close(written[name], tensor, atol=1e-4, rtol=0, msg=name)


def relaunch(entry: str, job: dict, tmp_path: Path) -> dict:
    """The same learner job again, on two processes, quietly (a rerun after a kill)."""
    return launch(
        entry,
        job,
        tmp_path / "learner",
        DistributedConfig(num_processes=2),
        on_line=lambda line: None,
        on_log=lambda step, m: None,
    )


def killed_launch(entry: str, job: dict, tmp_path: Path, rank: int, at: int) -> str:
    """The learner job on two processes, `rank` killed with SIGKILL once rank 0 has logged step
    (or iteration) `at`: the launch's one-line error, after checking no worker outlived it."""
    pids: dict[int, int] = {}

    def on_line(line: str) -> None:
        if line.startswith("worker rank "):
            _, _, r, _, pid = line.split()
            pids[int(r)] = int(pid)

    def on_log(step: int, metrics: dict) -> None:
        if step == at:
            os.kill(pids[rank], signal.SIGKILL)

    with pytest.raises(UserError) as failure:
        launch(
            entry,
            job,
            tmp_path / "learner",
            DistributedConfig(num_processes=2),
            on_line=on_line,
            on_log=on_log,
        )
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids.values() if _alive(p)], "a worker outlived the launch"
    return str(failure.value)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


def test_a_killed_rank_fails_with_one_line_leaves_nothing_and_resumes(tiny_gpt2, splits, tmp_path):
    job = sft_job(tiny_gpt2, splits, tmp_path, "kill", max_steps=24)
    message = killed_launch("sft", job, tmp_path, rank=1, at=12)  # checkpoints at 5 and 10 exist
    assert message == "sft: rank 1 failed: killed by signal 9", message

    out = relaunch("sft", job, tmp_path)
    assert out["result"]["resumed_from_step"] == 10 and out["result"]["steps"] == 24


def test_a_killed_policy_learner_resumes_to_the_uninterrupted_result(tiny_gpt2, tmp_path):
    """GRPO on two processes, rank 0 killed after iteration 3 (checkpoint at 2): the stage fails
    with one line, and the rerun resumes from iteration 2 to the weights of one uninterrupted
    process (each rollout chunk's noise is seeded by its iteration, so a resumed run draws the
    same samples)."""
    from rlhf_core.config import GRPOConfig
    from rlhf_core.ppo.build import build_ppo_trainer
    from tests.helpers import demo_rows, untrained_reward_dir

    cfg = GRPOConfig(**POLICY, samples_per_prompt=4)
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    prompts = [r["prompt"] for r in demo_rows()[:40]]
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(reward), prompts, cfg, ModelConfig(), progress=False
    )
    trainer.train()

    job = policy_job("grpo", cfg, tiny_gpt2, reward, prompts, tmp_path, "kill")
    message = killed_launch("policy", job, tmp_path, rank=0, at=3)
    assert message == "policy: rank 0 failed: killed by signal 9", message
    assert not (tmp_path / "model-kill").exists()

    out = relaunch("policy", job, tmp_path)
    assert out["result"]["resumed_from"] == 2 and out["result"]["iterations"] == 4
    assert_same_policy(tmp_path / "model-kill", trainer)


def test_sharded_engines_are_refused_on_cpu_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    for strategy in ("fsdp", "deepspeed"):
        with pytest.raises(UserError, match=f"distributed.strategy {strategy} needs GPUs"):
            launch_command(DistributedConfig(num_processes=2, strategy=strategy), tmp_path / "j")


def test_the_whole_pipeline_on_two_processes(prefect_harness, tmp_path):
    """distributed.num_processes 2 end to end: SFT, the reward model, RLOO (its rollout chunks
    split between the processes, judged checks by rank 0) and then, on the same work dir, DPO;
    every training stage's MLflow run records the world size its learner reported."""
    from mlflow.tracking import MlflowClient

    from rlhf_core.config import RLOOConfig
    from tests.test_flow import run_flow, stage_runs, whole_pipeline_cfg

    base = whole_pipeline_cfg(tmp_path)
    base = base.model_copy(
        update={
            "distributed": DistributedConfig(num_processes=2),
            "run": base.run.model_copy(update={"method": "rloo"}),
            "rloo": RLOOConfig(
                iterations=3,
                batch_size=8,
                samples_per_prompt=2,
                generation_batch_size=4,
                mini_batch_size=8,
                micro_batch_size=4,
                max_new_tokens=8,
                eval_every=2,
                eval_prompts=6,
                checkpoint_every=2,
            ),
        }
    )
    client = MlflowClient(base.mlflow_tracking_uri)
    state = run_flow(base)
    assert state.is_completed(), state.message
    result = state.result()
    stages = stage_runs(client, result["mlflow_run_id"])
    for name in ("sft", "reward-train", "rloo"):
        assert stages[name].data.params["world_size"] == "2", name
    rloo = stages["rloo"]
    assert [m.step for m in client.get_metric_history(rloo.info.run_id, "score")] == [1, 2, 3]
    checks = client.get_metric_history(rloo.info.run_id, "val_win_rate")
    assert [m.step for m in checks] == [2, 3]
    assert {a.path for a in client.list_artifacts(rloo.info.run_id)} >= {"model", "samples"}
    assert result["registry"]["version"]

    dpo = base.model_copy(
        update={
            "run": base.run.model_copy(update={"method": "dpo"}),
            "dpo": base.dpo.model_validate(
                {"max_steps": 8, "batch_size": 8, "lr": 5e-4, "eval_every": 4, "max_length": 96}
            ),
        }
    )
    state = run_flow(dpo)
    assert state.is_completed(), state.message
    stages = stage_runs(client, state.result()["mlflow_run_id"])
    assert stages["dpo"].data.params["world_size"] == "2"
    history = client.get_metric_history(stages["dpo"].info.run_id, "eval_loss")
    assert [m.step for m in history] == [4, 8]


def test_sft_and_reward_on_a_local_ray_cluster(prefect_harness, ray_cluster, tmp_path):
    """distributed.backend ray: Ray Train's TorchTrainer runs the learners on the cluster's two
    workers; each stage's MLflow run records world size 2."""
    from mlflow.tracking import MlflowClient

    from rlhf_core.config import LabelsConfig
    from tests.test_flow import make_cfg, run_flow, stage_runs

    cfg = make_cfg(tmp_path, until="reward")
    cfg = cfg.model_copy(
        update={
            "distributed": DistributedConfig(
                num_processes=2, backend="ray", ray_address=ray_cluster, threads_per_process=1
            ),
            "labels": LabelsConfig(enabled=False),
            "reward": RewardConfig(
                **FINE_TUNED,
                max_steps=6,
                eval_every=6,
                checkpoint_every=6,
                norm_prompts=4,
                max_length=96,
            ),
        }
    )
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    runs = stage_runs(MlflowClient(cfg.mlflow_tracking_uri), state.result()["mlflow_run_id"])
    for name, steps in (("sft", 12), ("reward-train", 6)):
        assert runs[name].data.params["world_size"] == "2", name
        assert runs[name].data.metrics["steps"] == steps, name
