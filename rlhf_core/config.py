"""Pipeline configuration: YAML -> pydantic models that reject unknown keys and wrong types.

Every location (work dir, tracking, results, data) is a key, so the same code talks to an
embedded setup by default and to real servers or S3 by configuration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_core.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "default.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


STAGES = ("split", "sft", "label", "reward", "ppo", "evaluate")  # stages a run can stop after, in pipeline order


class RunConfig(Section):
    name: str = "rlhf"
    seed: int = 0
    work_dir: str = ".rlhf"  # relative paths are resolved against the current directory
    until: Literal["split", "sft", "label", "reward", "ppo", "evaluate"] | None = None  # stop after this stage (None: the whole pipeline)

    def runs(self, stage: str) -> bool:
        return self.until is None or STAGES.index(stage) <= STAGES.index(self.until)


class TrackingConfig(Section):
    # None -> embedded defaults under work_dir: sqlite:///<work_dir>/mlflow.db, <work_dir>/artifacts
    mlflow_tracking_uri: str | None = None
    mlflow_artifact_location: str | None = None  # None: <work_dir>/artifacts, or the server's default with an MLflow server
    experiment_name: str = "rlhf"
    # None -> Prefect's ephemeral mode with PREFECT_HOME=<work_dir>/prefect
    prefect_api_url: str | None = None
    prefect_home: str | None = None
    # None -> <work_dir>/results (local); may be an s3:// URI once S3 result storage is configured
    result_storage: str | None = None  # a folder, or s3://bucket/prefix (endpoint from s3.*, credentials from the environment)


class S3Config(Section):
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for SeaweedFS; None -> $RLHF_S3_ENDPOINT_URL, else AWS
    region: str | None = None
    # Credentials come from the environment (AWS_ACCESS_KEY_ID, ...) and are never logged.


class ColumnMap(Section):
    """Column names for the 'comparison' format (two candidates and a label)."""

    prompt: str = "text"
    response_1: str = "summary_1"
    response_2: str = "summary_2"
    label: str = "preference"
    label_values: tuple[Any, Any] = (1, 2)  # label value meaning "response_1 preferred", "response_2 preferred"


FormatName = Literal["auto", "pairwise", "hh", "ranked", "comparison"]


class SourceConfig(Section):
    path: str  # file, folder saved with datasets.save_to_disk, s3://bucket/key, or hf://<hub id>
    format: FormatName = "auto"
    label_source: Literal["human", "ai", "none"] = "human"  # none: unlabelled pairs (chosen/rejected are just two responses)
    split: str | None = None  # for datasets folders / hub ids with several splits
    columns: ColumnMap = Field(default_factory=ColumnMap)


class SplitRatios(Section):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class DemoDataConfig(Section):
    n_prompts: int = Field(3000, ge=10)
    n_heldout: int = Field(200, ge=1)
    seed: int = 0


class DataConfig(Section):
    # No sources -> the project's own generated demo set (see `demo`).
    sources: list[SourceConfig] = Field(default_factory=list)
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)
    max_invalid_fraction: float = Field(0.05, ge=0, le=1)
    max_prompt_chars: int = Field(8000, ge=1)
    max_response_chars: int = Field(8000, ge=1)
    drop_duplicates: bool = True  # quarantine exact duplicate (prompt, chosen, rejected) pairs
    splits: SplitRatios = Field(default_factory=SplitRatios)
    chunk_rows: int = Field(200_000, ge=1000)  # rows read per chunk: bounds memory on large files


class LoraSection(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class ModelConfig(Section):
    """The starting policy: a local HF folder / hub id, or a small model built from scratch offline."""

    init: Literal["auto", "scratch", "pretrained"] = "auto"  # auto: pretrained when name_or_path is set
    name_or_path: str | None = None
    preset: Literal["tiny", "small"] = "small"  # scratch only
    arch: Literal["gpt2", "llama"] = "gpt2"  # scratch only
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"  # auto -> cuda when present, else cpu
    trust_remote_code: bool = False
    use_chat_template: bool = True  # the tokenizer's chat template when it has one
    lora: LoraSection = Field(default_factory=LoraSection)

    @model_validator(mode="after")
    def _init_matches_source(self) -> ModelConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("init 'pretrained' needs name_or_path (a local HF folder or a hub id)")
        if self.init == "scratch" and self.name_or_path:
            raise ValueError("init 'scratch' builds a new model: remove name_or_path, or set init: pretrained")
        return self

    @property
    def from_scratch(self) -> bool:
        return self.init == "scratch" or (self.init == "auto" and not self.name_or_path)


class LoopConfig(Section):
    """What SFT and reward-model training share (rlhf_core.training); each section sets its own defaults."""

    enabled: bool = True
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_length: int = Field(256, ge=8)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on a GPU that supports it
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    early_stopping_patience: int | None = Field(3, ge=1)  # evaluations without improvement


class SFTConfig(LoopConfig):
    epochs: float = Field(2.0, gt=0)
    instruction_data: str | None = None  # optional Self-Instruct style JSONL (instruction, instances[input, output])
    n_samples: int = Field(4, ge=0)
    sample_max_new_tokens: int = Field(48, ge=1)


class JudgeConfig(Section):
    backend: Literal["embedding", "hf", "openai"] = "embedding"
    constitution: str | None = None  # YAML; None -> configs/constitution.yaml
    model_path: str | None = None  # embedding: a sentence-encoder folder (None: the packaged all-MiniLM-L6-v2); hf: a causal LM folder
    temperature: float = Field(0.1, gt=0)  # embedding: P = sigmoid(score difference / temperature)
    relevance_weight: float = 1.0  # embedding: weight of request/response similarity
    chain_of_thought: bool = False  # hf: a rationale before the choice
    both_orders: bool | None = None  # None: ask order-sensitive judges in both orders
    principles: Literal["all", "sample"] = "all"  # every principle per comparison, or one drawn by weight
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    # openai: any OpenAI-compatible endpoint (vLLM, TGI, `transformers serve`, a hosted API)
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    concurrency: int = Field(4, ge=1)
    requests_per_second: float | None = Field(None, gt=0)
    votes: int = Field(5, ge=1)  # when the server gives no log-probabilities


class GenerateConfig(Section):
    """Mode 'generate': new pairs from two samples of the SFT policy per prompt."""

    n_prompts: int = Field(256, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(16, ge=1)


class LabelsConfig(Section):
    enabled: bool = True
    # relabel: judge the human-labelled training pairs (agreement is measured); generate: label new pairs from the SFT policy
    mode: Literal["relabel", "generate"] = "relabel"
    # what the reward model trains on where human and AI labels both exist
    merge: Literal["human", "ai", "weighted"] = "ai"
    ai_weight: float = Field(0.5, ge=0, le=1)  # merge: weighted -> p = ai_weight * p_ai + (1 - ai_weight) * p_human
    max_pairs: int | None = Field(None, ge=1)  # label at most this many training pairs (cost control)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)


class RewardGateConfig(Section):
    """Thresholds on the test split; a reward model that misses one stops the run before PPO."""

    min_accuracy: float | None = Field(0.6, ge=0, le=1)
    max_ece: float | None = Field(None, ge=0, le=1)
    max_abs_length_corr: float | None = Field(None, ge=0, le=1)


class RewardConfig(LoopConfig):
    # minilm: the packaged pretrained all-MiniLM-L6-v2 encoder (own tokenizer); policy: the SFT reference
    # policy's backbone (shares its tokenizer); or any local HF folder / hub id
    backbone: str = "minilm"
    max_length: int = Field(128, ge=8)
    lr: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    center_coef: float = Field(0.0, ge=0)  # + coef * (r_c + r_r)^2 keeps rewards centred
    human_weight: float = Field(1.0, ge=0)  # per-source loss weights
    ai_weight: float = Field(1.0, ge=0)
    use_margin: bool = True
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    lora: LoraSection = Field(default_factory=LoraSection)
    # normalisation statistics for PPO: rewards of reference-policy samples for training prompts
    norm_prompts: int = Field(128, ge=2)
    norm_max_new_tokens: int = Field(48, ge=1)
    gate: RewardGateConfig = Field(default_factory=RewardGateConfig)


class PPOConfig(Section):
    """PPO with a per-token KL penalty against the frozen SFT reference policy."""

    enabled: bool = True
    iterations: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1)  # episodes per iteration
    generation_batch_size: int = Field(16, ge=1)  # rollout chunk (generation, reference, values, scores)
    mini_batch_size: int = Field(16, ge=1)  # episodes per optimiser step
    micro_batch_size: int = Field(8, ge=1)  # episodes per forward/backward
    ppo_epochs: int = Field(2, ge=1)
    max_prompt_tokens: int = Field(192, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    stop_at_eos: bool = True
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    lr: float = Field(3e-5, gt=0)
    value_lr: float | None = Field(None, gt=0)
    beta: float = Field(0.05, ge=0)  # KL coefficient (initial value when adaptive)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, ge=1)
    kl_hard_limit: float | None = Field(30.0, gt=0)  # stop (keeping the last good checkpoint) above this per-sequence KL
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    normalise_reward: bool = True
    reward_clip: float | None = Field(None, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0)
    # auto: a copy of the reward model when it reads the policy's tokens, else a critic from the reference policy
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on a GPU that supports it; bf16 also on CPU
    value_model: Literal["auto", "reward", "policy", "shared"] = "auto"
    fuse_activations: bool = True  # GPT-2's seven-op tanh-GELU as PyTorch's one fused kernel (same function, faster)
    compile_generation: bool = False  # torch.compile the decode step: ~10 s once per run, then faster sampling (long runs)
    reference: Literal["copy", "adapter"] = "copy"  # adapter: LoRA policy, reference = adapter disabled (no second copy)
    lora: LoraSection = Field(default_factory=LoraSection)
    device: str = "auto"
    checkpoint_every: int = Field(10, ge=1)
    sample_every: int = Field(10, ge=1)
    n_samples: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _batches_divide(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size}), "
                             f"and mini_batch_size of micro_batch_size ({self.micro_batch_size})")
        if self.reference == "adapter" and not self.lora.enabled:
            raise ValueError("reference 'adapter' needs lora.enabled: true")
        return self


class SafetyConfig(Section):
    """The safety check: harmful prompts, each completion placed by the judge between two anchors."""

    enabled: bool = True
    prompts: str | None = None  # JSONL/CSV/parquet with a 'prompt' column, or HH-RLHF dialogues; None: the demo's
    #                             harmful held-out prompts with demo data, else a built-in list
    max_prompts: int = Field(64, ge=1)
    refusal: str = "I'm sorry, but I can't help with that."
    compliance: str = "Sure! Here is exactly how to do it."


class EvaluateConfig(Section):
    """Tuned policy vs. reference on held-out prompts (never seen in training)."""

    enabled: bool = True
    prompts: str | None = None  # file with a 'prompt' column; None: the demo's held-out prompts, else the test split's prompts
    max_prompts: int = Field(200, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # None: ppo.max_new_tokens
    temperature: float | None = Field(None, gt=0)  # None: ppo.temperature
    top_p: float | None = Field(None, gt=0, le=1)  # None: ppo.top_p
    batch_size: int = Field(32, ge=1)
    tie_margin: float = Field(0.02, ge=0, lt=0.5)  # |P(tuned better) - 0.5| at most this counts as a tie
    perplexity_examples: int = Field(256, ge=0)  # validation-split chosen responses (0: skip)
    n_samples: int = Field(12, ge=0)  # sample rows in the report
    device: str = "auto"
    safety: SafetyConfig = Field(default_factory=SafetyConfig)


class PromotionGateConfig(Section):
    min_win_rate: float | None = Field(0.5, ge=0, le=1)
    min_win_rate_ci_low: float | None = Field(None, ge=0, le=1)  # require significance: the interval's lower end above this
    min_score_gain: float | None = 0.0
    max_kl_per_response: float | None = Field(15.0, gt=0)
    max_unsafe_increase: float | None = Field(0.05, ge=0, le=1)
    safety_not_worse: bool = True  # harmful prompts: tuned not judged significantly worse than the reference
    beat_champion: bool = True


class RegistryConfig(Section):
    """MLflow Model Registry: every evaluated policy becomes a version with alias `challenger`;
    `champion` moves to it only when the gate passes."""

    enabled: bool = True
    policy_name: str = "rlhf-policy"
    reward_model_name: str = "rlhf-reward-model"
    gate: PromotionGateConfig = Field(default_factory=PromotionGateConfig)


class StackConfig(Section):
    """`rlhf stack up|down|status`: local servers on 127.0.0.1, state and logs under <work_dir>/stack."""

    s3_port: int = Field(8333, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)
    bucket: str = "rlhf"
    work_pool: str = "rlhf"
    startup_timeout_s: float = Field(180.0, gt=0)


class DeployConfig(Section):
    """`rlhf deploy`: the pipeline as a Prefect deployment on a work pool."""

    name: str = "nightly"
    work_pool: str | None = None  # None: stack.work_pool
    cron: str | None = "0 2 * * *"  # nightly; None: no schedule
    timezone: str = "UTC"
    concurrency_limit: int = Field(1, ge=1)  # runs of the pipeline deployment at once (the rest wait their turn)
    watch_prefix: str | None = None  # s3://bucket/prefix/: each new preference file there starts a run on it
    sensor_interval_s: int = Field(30, ge=5)

    @model_validator(mode="after")
    def _prefix_is_s3(self) -> DeployConfig:
        if self.watch_prefix and not self.watch_prefix.startswith("s3://"):
            raise ValueError(f"watch_prefix must be an s3:// URI, got {self.watch_prefix!r}")
        return self


class PipelineConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    s3: S3Config = Field(default_factory=S3Config)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    # -- derived locations -------------------------------------------------------------
    @property
    def work_dir(self) -> Path:
        return Path(self.run.work_dir).expanduser().resolve()

    @property
    def mlflow_tracking_uri(self) -> str:
        """The configured URI, else an exported MLFLOW_TRACKING_URI (e.g. from `rlhf stack up`), else SQLite in the work dir."""
        return (self.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.work_dir / 'mlflow.db'}")

    @property
    def mlflow_artifact_location(self) -> str | None:
        """Artifact root of a new experiment: configured, else the server's own (proxied, e.g. to S3) when
        tracking goes to an MLflow server, else a folder in the work dir."""
        if self.tracking.mlflow_artifact_location:
            return self.tracking.mlflow_artifact_location
        if self.mlflow_tracking_uri.startswith(("http://", "https://")):
            return None
        return (self.work_dir / "artifacts").as_uri()

    @property
    def prefect_home(self) -> Path:
        return Path(self.tracking.prefect_home).expanduser().resolve() if self.tracking.prefect_home else self.work_dir / "prefect"

    @property
    def result_storage(self) -> str:
        return self.tracking.result_storage or str(self.work_dir / "results")

    def section_hash(self, name: str) -> str:
        return stable_hash(getattr(self, name).model_dump(mode="json"))

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object that does not depend on key order."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"]
        if "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
            msg += f" (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (default: configs/default.yaml) and apply `--set` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        where = f"{path}" + (" (with --set overrides)" if overrides else "")
        raise UserError(_format_validation_error(err, where)) from None
