"""The reward model as an MLflow pyfunc: DataFrame(prompt, response) -> score (normalised), raw_score."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    ARTIFACT = "reward_model"

    def load_context(self, context) -> None:
        from rlhf_core.reward.model import load_reward_model

        self.rm = load_reward_model(context.artifacts[self.ARTIFACT], device="cpu")

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        raw = self.rm.score(
            model_input["prompt"].astype(str).tolist(), model_input["response"].astype(str).tolist()
        )
        return pd.DataFrame({"score": self.rm.normalise(raw), "raw_score": raw})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("double", "raw_score")]),
    )
