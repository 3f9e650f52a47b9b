"""The pipeline flow for real: Prefect (ephemeral test API), MLflow on SQLite, files on disk; then read MLflow back."""

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlhf_core.config import GRPOConfig, OnlineDPOConfig, PipelineConfig, RLOOConfig
from tests.helpers import FINE_TUNED

pytestmark = pytest.mark.slow


def make_cfg(tmp_path: Path, until: str = "split", **data) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "run": {"name": "test", "work_dir": str(tmp_path / "work"), "until": until},
            "model": {"preset": "tiny"},
            "sft": {
                "max_steps": 12,
                "batch_size": 8,
                "eval_every": 6,
                "checkpoint_every": 6,
                "n_samples": 2,
                "sample_max_new_tokens": 8,
            },
            "tracking": {"experiment_name": "flow-tests"},
            "data": {"demo": {"n_prompts": 400, "n_heldout": 20}, **data},
            "reward": FINE_TUNED,
        }
    )


def run_flow(cfg: PipelineConfig):
    from flows.pipeline import rlhf_pipeline

    return rlhf_pipeline(config=cfg.model_dump(mode="json"), return_state=True)


def stage_runs(client: MlflowClient, parent_id: str) -> dict:
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {c.data.tags["rlhf.stage"]: c for c in children}


def test_demo_pipeline_tracked_in_mlflow_and_cached_on_rerun(prefect_harness, tmp_path):
    cfg = make_cfg(tmp_path)
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    client = MlflowClient(cfg.mlflow_tracking_uri)

    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rlhf.config_hash"] == cfg.config_hash()
    assert parent.data.tags["rlhf.git_commit"]
    assert parent.data.params["data.max_invalid_fraction"] == "0.05"
    art = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert art == {"config/resolved_config.yaml", "config/environment.json"}
    env = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "config/environment.json", str(tmp_path))
        ).read_text()
    )
    assert env["packages"]["prefect"].startswith("3.") and env["packages"]["pandera"]

    stages = stage_runs(client, parent.info.run_id)
    assert set(stages) == {"demo-data", "ingest", "validate", "split"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    v = stages["validate"].data
    assert (
        v.metrics["records"] == 400 and v.metrics["valid"] == 400 and v.metrics["quarantined"] == 0
    )
    assert {
        a.path for a in client.list_artifacts(stages["validate"].info.run_id, "validation")
    } == {"validation/quarantine.jsonl", "validation/report.json"}
    split = stages["split"].data.metrics
    assert split["rows_train"] + split["rows_val"] + split["rows_test"] == 400

    # The dataset and its version are logged with mlflow.data on the parent run (and the split stage).
    inputs = parent.inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {
        "preferences-train",
        "preferences-val",
        "preferences-test",
    }
    assert {i.dataset.digest for i in inputs} == {result["dataset_version"]}
    assert {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"} == {
        "train",
        "val",
        "test",
    }
    schema = json.loads(inputs[0].dataset.schema)
    assert {c["name"] for c in schema["mlflow_colspec"]} >= {
        "prompt",
        "chosen",
        "rejected",
        "p_chosen",
        "label_source",
    }

    # Unchanged inputs: every stage is served from the cache, and MLflow still shows each stage.
    state2 = run_flow(cfg)
    assert state2.is_completed()
    result2 = state2.result()
    assert result2["dataset_version"] == result["dataset_version"]
    stages2 = stage_runs(client, result2["mlflow_run_id"])
    assert set(stages2) == set(stages)
    for name, run in stages2.items():
        assert run.info.run_name == f"{name} (cached)"
        assert run.data.tags["rlhf.cached_from_run"] == stages[name].info.run_id
    assert stages2["validate"].data.metrics["valid"] == 400

    # Cached results are plain JSON, typed again on the way back: nothing is ever unpickled.
    records = [
        json.loads(f.read_bytes()) for f in Path(cfg.result_storage).rglob("*") if f.is_file()
    ]
    assert len(records) >= 4  # demo-data, ingest, validate, split
    assert {r["metadata"]["serializer"]["type"] for r in records} == {"rlhf-stage-json"}
    assert all(json.loads(r["result"])["kind"] for r in records)

    # A cached stage whose files were deleted is recomputed, not trusted.
    shutil.rmtree(Path(cfg.run.work_dir) / "stages" / "datasets")
    state3 = run_flow(cfg)
    assert state3.is_completed()
    stages3 = stage_runs(client, state3.result()["mlflow_run_id"])
    assert (
        stages3["split"].info.run_name == "split"
        and stages3["validate"].info.run_name == "validate (cached)"
    )
    assert Path(state3.result()["splits"]["train"]).exists()


def test_config_change_invalidates_only_later_stages(prefect_harness, tmp_path):
    cfg = make_cfg(tmp_path)
    assert run_flow(cfg).is_completed()
    changed = make_cfg(tmp_path, splits={"train": 0.6, "val": 0.2, "test": 0.2})
    state = run_flow(changed)
    stages = stage_runs(MlflowClient(cfg.mlflow_tracking_uri), state.result()["mlflow_run_id"])
    assert (
        stages["ingest"].info.run_name == "ingest (cached)"
        and stages["validate"].info.run_name == "validate (cached)"
    )
    assert stages["split"].info.run_name == "split"


def test_real_hh_rlhf_sample(prefect_harness, tmp_path, hh_sample):
    cfg = make_cfg(tmp_path, sources=[{"path": str(hh_sample), "format": "hh"}])
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    stages = stage_runs(MlflowClient(cfg.mlflow_tracking_uri), state.result()["mlflow_run_id"])
    m = stages["validate"].data.metrics
    assert m["records"] == 1800 and m["valid"] + m["quarantined"] == 1800
    assert m["valid"] > 1750  # a handful of real rows have an empty reply
    assert "demo-data" not in stages
    import pandas as pd

    splits = {s: pd.read_parquet(p) for s, p in state.result()["splits"].items()}
    assert sum(len(df) for df in splits.values()) == m["valid"]
    prompts = [set(df["prompt"]) for df in splits.values()]
    assert (
        not (prompts[0] & prompts[1])
        and not (prompts[0] & prompts[2])
        and not (prompts[1] & prompts[2])
    )
    assert all(p.endswith("\n\nAssistant:") for p in splits["train"]["prompt"])


def test_too_many_invalid_rows_fails_clearly_and_keeps_quarantine(prefect_harness, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": f"q{i}", "chosen": "a", "rejected": "b" if i % 2 else "a"} for i in range(100)
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(tmp_path, sources=[{"path": str(bad)}], max_invalid_fraction=0.1)
    state = run_flow(cfg)
    assert state.is_failed()
    assert state.message.startswith(
        "50.0% of source records are invalid (limit data.max_invalid_fraction=0.1)"
    )
    client = MlflowClient(cfg.mlflow_tracking_uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("flow-tests").experiment_id],
        filter_string="tags.`rlhf.kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
    )[0]
    assert parent.info.status == "FAILED"
    stages = stage_runs(client, parent.info.run_id)
    assert stages["validate"].info.status == "FAILED" and "split" not in stages
    quarantine = client.download_artifacts(
        stages["validate"].info.run_id, "validation/quarantine.jsonl", str(tmp_path)
    )
    assert sum(1 for _ in open(quarantine)) == 50


def test_s3_source_through_the_flow(prefect_harness, tmp_path, s3_env):
    body = "".join(
        json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
        for i in range(30)
    )
    s3_env.client().put_object(Bucket="prefs", Key="incoming/batch-1.jsonl", Body=body.encode())
    cfg = make_cfg(tmp_path, sources=[{"path": "s3://prefs/incoming/batch-1.jsonl"}])
    cfg = cfg.model_copy(
        update={"s3": cfg.s3.model_copy(update={"endpoint_url": s3_env.endpoint_url})}
    )
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    stages = stage_runs(MlflowClient(cfg.mlflow_tracking_uri), state.result()["mlflow_run_id"])
    assert stages["validate"].data.metrics["valid"] == 30
    assert s3_env.secret_key not in json.dumps(
        MlflowClient(cfg.mlflow_tracking_uri).get_run(state.result()["mlflow_run_id"]).data.params
    )


def test_sft_stage_makes_a_reference_policy(prefect_harness, tmp_path):
    cfg = make_cfg(tmp_path, until="sft")
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    policy = Path(result["reference_policy"])
    assert (policy / "model.safetensors").exists() and (policy / "tokenizer.json").exists()
    client = MlflowClient(cfg.mlflow_tracking_uri)
    stages = stage_runs(client, result["mlflow_run_id"])
    assert {"init-policy", "sft"} <= set(stages)
    sft = stages["sft"]
    history = client.get_metric_history(sft.info.run_id, "eval_loss")
    assert [m.step for m in history] == [6, 12]
    assert sft.data.metrics["steps"] == 12 and sft.data.metrics["best_eval_loss"] < 10
    assert {a.path for a in client.list_artifacts(sft.info.run_id)} >= {"model", "samples"}
    assert "model.safetensors" in {
        Path(a.path).name for a in client.list_artifacts(sft.info.run_id, "model")
    }
    assert not (
        policy.parent.parent / (policy.parent.name + ".checkpoints")
    ).exists()  # cleaned after success

    from rlhf_core.models.loading import load_causal_lm

    assert load_causal_lm(str(policy), device="cpu").model.config.model_type == "gpt2"
    again = run_flow(cfg)
    stages2 = stage_runs(client, again.result()["mlflow_run_id"])
    assert stages2["sft"].info.run_name == "sft (cached)" and again.result()[
        "reference_policy"
    ] == str(policy)


def test_pretrained_checkpoint_skips_scratch_init(prefect_harness, tmp_path, tiny_llama):
    cfg = make_cfg(tmp_path, until="sft")
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": str(tiny_llama)})}
    )
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    stages = stage_runs(MlflowClient(cfg.mlflow_tracking_uri), state.result()["mlflow_run_id"])
    assert "init-policy" not in stages and stages["sft"].data.params["base_model"] == str(
        tiny_llama
    )


def test_stage_keys_follow_the_content_of_the_files_settings_name(tmp_path):
    """A constitution file or a model folder rewritten in place (the same path) gives a new key,
    in the same process too; an untouched one the same key."""
    from rlhf_core.config import JudgeConfig, RewardConfig
    from tasks.stage import input_digest

    constitution = tmp_path / "principles.yaml"
    constitution.write_text("name: a\n")
    backbone = tmp_path / "backbone"
    (backbone / "sub").mkdir(parents=True)
    (backbone / "sub" / "model.safetensors").write_bytes(b"weights v1")
    judge, reward = (
        JudgeConfig(constitution=str(constitution)),
        RewardConfig(backbone=str(backbone)),
    )
    before = input_digest(judge), input_digest(reward)
    assert (input_digest(judge), input_digest(reward)) == before
    constitution.write_text("name: b\n")
    assert input_digest(judge) != before[0]
    (backbone / "sub" / "model.safetensors").write_bytes(b"weights v2")
    assert input_digest(reward) != before[1]


class _Planted:
    """Unpickling this writes a file: code run by whoever planted the record."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_record_is_refused_not_unpickled(prefect_harness, tmp_path):
    """Prefect loads a stored record with the serializer the record names: a pickle planted under
    a stage's key would run code at the next cache hit. It is refused with one line, unread."""
    import base64
    import pickle

    cfg = make_cfg(tmp_path)
    assert run_flow(cfg).is_completed()
    records = [p for p in Path(cfg.result_storage).iterdir() if p.name.startswith("ingest-")]
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    assert record["metadata"]["serializer"]["type"] == "rlhf-stage-json"
    marker = tmp_path / "planted-code-ran"
    record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    record["result"] = base64.b64encode(pickle.dumps(_Planted(marker))).decode()
    records[0].write_text(json.dumps(record))
    state = run_flow(cfg)
    assert state.is_failed()
    assert f"the stored result {records[0].name}" in state.message
    assert "serializer 'pickle'" in state.message and "\n" not in state.message
    assert not marker.exists()


def test_bad_model_path_fails_with_one_line(prefect_harness, tmp_path):
    cfg = make_cfg(tmp_path, until="sft")
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name_or_path": str(tmp_path / "no-model")})}
    )
    state = run_flow(cfg)
    assert state.is_failed() and "no such model folder" in state.message
    again = run_flow(cfg)  # a failure is not a cached result: the same key fails the same way
    assert again.is_failed() and again.message == state.message


def test_label_stage_rlaif(prefect_harness, tmp_path):
    cfg = make_cfg(tmp_path, until="label")
    cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"max_pairs": 60})})
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    client = MlflowClient(cfg.mlflow_tracking_uri)
    stages = stage_runs(client, result["mlflow_run_id"])
    m = stages["label"].data.metrics
    assert (
        m["n_pairs"] == 60 and m["judged"] == 60 and m["agreement_accuracy"] > 0.8
    )  # the demo's labels are learnable
    assert "principle_harmless_prefers_chosen" in m and "agreement_cohen_kappa" in m
    plots = {a.path for a in client.list_artifacts(stages["label"].info.run_id, "labels/plots")}
    assert plots == {"labels/plots/label_distribution.png", "labels/plots/calibration.png"}
    import pandas as pd

    train = pd.read_parquet(result["train_file"])
    import pyarrow.parquet as pq

    meta = pq.read_schema(result["train_file"]).metadata
    assert meta[b"rlhf.labels.merge"] == b"ai" and meta[b"rlhf.labels.judge"].startswith(
        b"embedding@"
    )
    # merge: ai (RLAIF) on the 60 judged pairs; the other training pairs keep their human labels
    assert (train["label_source"] == "ai").sum() == 60 and len(train) > 60
    assert set(train["label_source"]) == {"ai", "human"}
    ai = train[train["label_source"] == "ai"]
    assert ((ai["p_chosen"] >= 0) & (ai["p_chosen"] <= 1)).all() and ai[
        "p_chosen"
    ].nunique() > 10  # soft labels

    # another merge policy re-runs the stage, but the judge is never asked again: the label cache answers
    changed = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"merge": "human"})})
    again = run_flow(changed)
    m2 = stage_runs(client, again.result()["mlflow_run_id"])["label"].data.metrics
    assert m2["judged"] == 0 and m2["cache_hits"] == 60
    assert set(pd.read_parquet(again.result()["train_file"])["label_source"]) == {"human"}


def whole_pipeline_cfg(tmp_path: Path) -> PipelineConfig:
    """The whole pipeline on the tiny demo, every stage cut short."""
    cfg = make_cfg(tmp_path, until=None)
    cfg = cfg.model_copy(
        update={
            "evaluate": cfg.evaluate.model_validate(
                {"max_prompts": 12, "perplexity_examples": 16, "safety": {"max_prompts": 4}}
            ),
            "registry": cfg.registry.model_validate(
                {"gate": {"min_win_rate": 0.0, "min_score_gain": None, "max_unsafe_increase": None}}
            ),
            "labels": cfg.labels.model_copy(update={"max_pairs": 160}),
            "reward": cfg.reward.model_validate(
                {
                    **FINE_TUNED,
                    "max_steps": 16,
                    "batch_size": 8,
                    "lr": 1e-4,
                    "max_length": 128,
                    "eval_every": 8,
                    "norm_prompts": 8,
                    "norm_max_new_tokens": 8,
                    "gate": {"min_accuracy": 0.6},
                }
            ),
            "ppo": cfg.ppo.model_validate(
                {
                    "iterations": 3,
                    "batch_size": 8,
                    "mini_batch_size": 8,
                    "micro_batch_size": 4,
                    "max_new_tokens": 8,
                    "sample_every": 2,
                    "checkpoint_every": 2,
                    "eval_every": 2,
                    "eval_prompts": 6,
                }
            ),
        }
    )
    return cfg


def test_reward_gate_ppo_evaluation_and_registry(prefect_harness, tmp_path):
    """The whole pipeline on the tiny demo: reward gate, PPO, evaluation, registry; then re-runs."""
    cfg = whole_pipeline_cfg(tmp_path)
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["reward"]["test_accuracy"] >= 0.6 and 0 <= result["reward"]["test_ece"] <= 1
    rm_meta = json.loads((Path(result["reward_model"]) / "reward_model.json").read_text())
    assert rm_meta["kind"] == "encoder" and rm_meta["normalisation"]["source"].startswith(
        "reference policy samples (8"
    )
    client = MlflowClient(cfg.mlflow_tracking_uri)
    stages = stage_runs(client, result["mlflow_run_id"])
    train, ev = stages["reward-train"], stages["reward-eval"]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "eval_accuracy")] == [
        8,
        16,
    ]
    assert (
        train.data.params["train_pairs_ai"] == "160" and train.data.metrics["reward_norm_std"] > 0
    )
    assert "model.safetensors" in {
        Path(a.path).name for a in client.list_artifacts(train.info.run_id, "reward_model")
    }
    plots = {Path(a.path).name for a in client.list_artifacts(ev.info.run_id, "reward_eval/plots")}
    assert {"test_calibration.png", "test_reward_histogram.png", "val_calibration.png"} <= plots
    assert {
        "test_accuracy",
        "test_auc",
        "test_ece",
        "test_length_correlation",
        "val_accuracy",
        "test_accuracy_human",
    } <= set(ev.data.metrics)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.metrics["reward_gate_passed"] == 1.0

    # PPO ran after the gate: a tuned policy folder, per-iteration metrics, samples and curves in MLflow
    from rlhf_core.models.loading import load_causal_lm

    assert load_causal_lm(result["tuned_policy"], device="cpu").model.config.model_type == "gpt2"
    ppo = stages["ppo"]
    assert [m.step for m in client.get_metric_history(ppo.info.run_id, "kl")] == [1, 2, 3]
    assert {"score", "score_raw", "entropy", "clipfrac", "episodes_per_s"} <= set(ppo.data.metrics)
    arts = {a.path for a in client.list_artifacts(ppo.info.run_id)}
    assert {"model", "plots", "samples"} <= arts
    # the judge checked the policy on validation prompts at iterations 2 and 3 (the last)
    assert [m.step for m in client.get_metric_history(ppo.info.run_id, "val_win_rate")] == [2, 3]
    assert ppo.data.params["monitor_prompts"] == "6"
    assert ppo.data.metrics["selected_iteration"] in (2.0, 3.0)
    assert {"val_kl", "val_score", "val_win_rate_ci_low", "val_win_rate_best"} <= set(
        ppo.data.metrics
    )
    assert "gold_vs_proxy.png" in {
        Path(a.path).name for a in client.list_artifacts(ppo.info.run_id, "plots")
    }
    table = json.loads(
        Path(
            client.download_artifacts(ppo.info.run_id, "samples/ppo_samples.json", str(tmp_path))
        ).read_text()
    )
    assert (
        len(table["data"]) == 2 * 4
    )  # iterations 1 and 3 (sample_every 2), n_samples 4, no duplicates
    stage_out = Path(result["tuned_policy"]).parent
    assert not stage_out.with_name(
        stage_out.name + ".checkpoints"
    ).exists()  # cleaned after success

    # evaluation: tuned vs. reference on the demo's held-out prompts, in the stage run and on the parent run
    ev_run = stages["evaluate"]
    assert (
        ev_run.data.params["n_prompts"] == "12"
        and ev_run.data.params["safety_prompts"] == "demo held-out (harmful)"
    )
    expected = {
        "eval_win_rate",
        "eval_win_rate_ci_low",
        "eval_score_gain",
        "eval_kl_per_token",
        "eval_kl_per_response",
        "eval_unsafe_rate_tuned",
        "eval_perplexity_reference",
        "eval_distinct_2_tuned",
        "eval_eos_rate_tuned",
    }
    assert expected <= set(ev_run.data.metrics) and expected <= set(parent.data.metrics)
    assert parent.data.metrics["registry_promoted"] == 1.0
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/report.json", "evaluation/plots"} <= report_files
    assert {
        Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "evaluation/plots")
    } == {
        "score_histogram.png",
        "length_histogram.png",
        "win_rate.png",
        "best_of_n.png",
        "training_curves.png",
    }
    report = Path(
        client.download_artifacts(parent.info.run_id, "evaluation/report.md", str(tmp_path))
    ).read_text()
    assert "### Registry: rlhf-policy v1" in report and "**champion**" in report

    # registry: version 1 of both models, tagged, with the aliases; the champion loads and generates
    import mlflow
    import pandas as pd

    reg = result["registry"]
    assert (reg["version"], reg["promoted"], sorted(reg["aliases"])) == (
        "1",
        True,
        ["challenger", "champion"],
    )
    version = client.get_model_version("rlhf-policy", "1")
    assert (
        version.tags["rlhf.dataset_version"] == result["dataset_version"]
        and version.tags["rlhf.config_hash"] == cfg.config_hash()
    )
    assert version.tags["rlhf.git_commit"] and float(
        version.tags["rlhf.eval_win_rate"]
    ) == pytest.approx(result["evaluation"]["eval_win_rate"], rel=1e-4)
    assert str(client.get_model_version_by_alias("rlhf-reward-model", "champion").version) == "1"
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    pipe = mlflow.transformers.load_model("models:/rlhf-policy@champion")
    prompt = "\n\nHuman: How do I make a cup of tea?\n\nAssistant:"
    generated = pipe(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0][
        "generated_text"
    ]
    assert generated.startswith(prompt) and len(generated) > len(prompt)
    assert isinstance(
        mlflow.pyfunc.load_model("models:/rlhf-policy@champion").predict(
            ["How do I make a cup of tea?"]
        )[0],
        str,
    )
    scores = mlflow.pyfunc.load_model("models:/rlhf-reward-model@champion").predict(
        pd.DataFrame(
            {
                "prompt": ["How do I make tea?"] * 2,
                "response": ["Boil water, steep the tea for three minutes.", "No."],
            }
        )
    )
    assert list(scores.columns) == ["score", "raw_score"] and scores["score"].notna().all()

    # the same config again: every stage cached, no new version
    again = run_flow(cfg).result()
    assert again["registry"]["version"] == "1" and "already registered" in again["registry"]["note"]
    assert len(client.search_model_versions("name = 'rlhf-policy'")) == 1
    assert len(client.search_model_versions("name = 'rlhf-reward-model'")) == 1

    # a new policy under a strict gate: version 2 is the challenger, compared with champion v1, not promoted
    stricter = cfg.model_copy(
        update={
            "ppo": cfg.ppo.model_copy(update={"iterations": 4}),
            "registry": cfg.registry.model_validate({"gate": {"min_win_rate": 0.99}}),
        }
    )
    third = run_flow(stricter).result()["registry"]
    assert (third["version"], third["promoted"], third["champion"]["version"]) == ("2", False, "1")
    assert "registry.gate.min_win_rate" in third["message"] and any(
        c["metric"] == "win_rate_vs_champion_v1" for c in third["checks"]
    )
    assert str(client.get_model_version_by_alias("rlhf-policy", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("rlhf-policy", "challenger").version) == "2"
    assert (
        len(client.search_model_versions("name = 'rlhf-reward-model'")) == 1
    )  # same reward model: registered once

    # a stricter gate: same (cached) reward model, the flow stops with the metric and threshold named
    strict = cfg.model_copy(
        update={
            "reward": cfg.reward.model_copy(
                update={"gate": cfg.reward.gate.model_copy(update={"max_ece": 0.0})}
            )
        }
    )
    failed = run_flow(strict)
    assert failed.is_failed()
    assert (
        failed.message.startswith("reward model gate failed: test_ece = ")
        and "(reward.gate.max_ece)" in failed.message
    )
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.`rlhf.stage` = 'reward-train'"
    )
    assert (
        sorted(r.info.run_name for r in runs) == ["reward-train"] + ["reward-train (cached)"] * 3
    )  # trained once, 4 runs
    failed_parent = client.search_runs(
        [parent.info.experiment_id], filter_string="attributes.status = 'FAILED'"
    )
    assert failed_parent and failed_parent[0].data.metrics["reward_gate_passed"] == 0.0
    assert "ppo" not in stage_runs(
        client, failed_parent[0].info.run_id
    )  # PPO never started on the failed model


def test_stage_code_version_follows_the_code_it_runs(tmp_path):
    """A stage's key holds the code it runs: its module and every project module that imports,
    at any depth (lazy imports too). Editing the training loop SFT uses invalidates SFT; editing
    the PPO trainer, which SFT never runs, does not."""
    import shutil

    from rlhf_core.config import PROJECT_ROOT
    from rlhf_core.provenance import files_version, import_closure
    from tasks.stage import PROJECT_PACKAGES

    for package in ("rlhf_core", "tasks"):
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package)
    sft_module = tmp_path / "tasks" / "models.py"
    closure = {
        str(p.relative_to(tmp_path))
        for p in import_closure([sft_module], tmp_path, PROJECT_PACKAGES)
    }
    assert {"rlhf_core/training.py", "rlhf_core/models/fused.py", "rlhf_core/sft.py"} <= closure
    before = files_version([sft_module], [], tmp_path, PROJECT_PACKAGES)
    with open(tmp_path / "rlhf_core" / "ppo" / "trainer.py", "a") as f:
        f.write("\n# an edit SFT never runs\n")
    assert files_version([sft_module], [], tmp_path, PROJECT_PACKAGES) == before
    with open(tmp_path / "rlhf_core" / "models" / "fused.py", "a") as f:
        f.write("\n# an edit SFT runs\n")
    assert files_version([sft_module], [], tmp_path, PROJECT_PACKAGES) != before


def test_dpo_method_through_the_registry(prefect_harness, tmp_path):
    """run.method=dpo: the same data, labels, evaluation and registry; DPO instead of PPO, and the
    same eval_* metrics on the parent run as a PPO run has."""
    cfg = whole_pipeline_cfg(tmp_path)
    cfg = cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"method": "dpo"}),
            "dpo": cfg.dpo.model_validate(
                {"max_steps": 8, "batch_size": 8, "lr": 5e-4, "eval_every": 4, "max_length": 96}
            ),
        }
    )
    state = run_flow(cfg)
    assert state.is_completed(), state.message
    result = state.result()
    client = MlflowClient(cfg.mlflow_tracking_uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["rlhf.method"] == "dpo" and parent.data.params["run.method"] == "dpo"
    stages = stage_runs(client, parent.info.run_id)
    assert "dpo" in stages and "ppo" not in stages
    dpo = stages["dpo"]
    assert [
        m.step for m in client.get_metric_history(dpo.info.run_id, "eval_rewards_accuracy")
    ] == [
        4,
        8,
    ]
    assert {"rewards_accuracy", "rewards_margin", "logps_chosen", "logps_rejected"} <= set(
        dpo.data.metrics
    )
    assert result["dpo"]["best_eval_loss"] > 0 and result["dpo"]["best_step"] in (4.0, 8.0)
    assert {
        "eval_win_rate",
        "eval_win_rate_ci_low",
        "eval_score_gain",
        "eval_kl_per_response",
        "eval_unsafe_rate_tuned",
    } <= set(parent.data.metrics)
    version = client.get_model_version("rlhf-policy", result["registry"]["version"])
    assert version.run_id and version.tags["rlhf.eval_win_rate"]
    # the reference log-probabilities were computed once, cached by content, and logged
    assert len(list((cfg.work_dir / "cache" / "dpo-reference").glob("*.safetensors"))) == 2
    assert len(client.list_artifacts(dpo.info.run_id, "reference_logps")) == 2


def test_rloo_grpo_and_online_dpo_through_the_registry(prefect_harness, tmp_path):
    """run.method=rloo, then grpo, then online_dpo on the same work dir: the data, label and reward stages come from
    the cache, each method's stage runs with its own section and no value model, and both register
    a version whose card names the method, with the same eval_* metrics on the parent run."""
    base = whole_pipeline_cfg(tmp_path)
    short = base.ppo.model_dump(
        include={
            "iterations",
            "batch_size",
            "mini_batch_size",
            "micro_batch_size",
            "max_new_tokens",
            "eval_every",
            "eval_prompts",
            "checkpoint_every",
            "sample_every",
        }
    )
    client = MlflowClient(base.mlflow_tracking_uri)
    methods = (("rloo", RLOOConfig), ("grpo", GRPOConfig), ("online_dpo", OnlineDPOConfig))
    for method, section in methods:
        cfg = base.model_copy(
            update={
                "run": base.run.model_copy(update={"method": method}),
                method: section.model_validate(short),
            }
        )
        state = run_flow(cfg)
        assert state.is_completed(), state.message
        result = state.result()
        parent = client.get_run(result["mlflow_run_id"])
        assert parent.data.tags["rlhf.method"] == method
        stages = stage_runs(client, parent.info.run_id)
        assert method in stages and "ppo" not in stages and "dpo" not in stages
        run = stages[method]
        assert run.data.params["value_model"] == "none"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1, 2, 3]
        if method != "rloo":  # later runs: everything before the method comes from the cache
            assert "rlhf.cached_from_run" in stages["reward-train"].data.tags
        if method == "grpo":
            assert "kl_k3" in run.data.metrics and run.data.params["loss_type"] == "dapo"
        if method == "online_dpo":  # its pairs judged through the label stage's cache
            assert {"judge_confidence", "rewards_accuracy"} <= set(run.data.metrics)
        assert {"eval_win_rate", "eval_kl_per_response"} <= set(parent.data.metrics)
        version = client.get_model_version("rlhf-policy", result["registry"]["version"])
        assert version.tags["rlhf.method"] == method
