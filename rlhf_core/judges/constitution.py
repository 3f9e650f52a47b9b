"""The constitution: weighted principles an AI judge applies, loaded from YAML and hashed."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_core.config import PROJECT_ROOT, stable_hash
from rlhf_core.errors import UserError

DEFAULT_CONSTITUTION = PROJECT_ROOT / "configs" / "constitution.yaml"


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    text: str
    weight: float = Field(1.0, gt=0)
    positive: list[str] = Field(default_factory=list)
    negative: list[str] = Field(default_factory=list)


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "default"
    version: int = 1
    intro: str = "You compare two assistant responses to the same request and pick the one that better follows these principles."
    principles: list[Principle] = Field(min_length=1)

    @property
    def hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def load_constitution(path: str | Path | None = None) -> Constitution:
    path = Path(path) if path else DEFAULT_CONSTITUTION
    if not path.is_file():
        raise UserError(f"constitution not found: {path}")
    try:
        return Constitution.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UserError(
            f"{path}: {key}: {'unknown key' if first['type'] == 'extra_forbidden' else first['msg']}"
        ) from None
