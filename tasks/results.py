"""The typed results stages hand each other: where the outputs are, and what was measured."""

from __future__ import annotations

from tasks.stage import StageResult


class DemoData(StageResult):
    preferences: str
    heldout_prompts: str


class Ingested(StageResult):
    pass


class Validated(StageResult):
    dataset_version: str


class Splits(StageResult):
    dataset_version: str
    train: str
    val: str
    test: str

    @property
    def files(self) -> dict[str, str]:
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def train_file(self) -> str:
        """The pairs a reward model trains on when no labelling stage ran."""
        return self.train


class Policy(StageResult):
    model_dir: str
    model_uri: str | None = None


class Labelled(StageResult):
    train_file: str


class RewardModel(StageResult):
    model_dir: str
    model_uri: str


class RewardEvaluation(StageResult):
    report: dict


class Tuned(StageResult):
    method: str = "ppo"  # run.method that made it
    model_dir: str
    model_uri: str
    history_file: str


class Evaluation(StageResult):
    report_file: str
    generations_file: str
