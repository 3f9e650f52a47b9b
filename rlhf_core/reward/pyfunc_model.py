"""MLflow models-from-code entry point for the registered reward model (MLflow loads this file)."""

from mlflow.models import set_model

from rlhf_core.reward.serving import RewardModelPyfunc

set_model(RewardModelPyfunc())
