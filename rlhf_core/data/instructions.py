"""Instruction data (Self-Instruct style) as extra SFT pairs."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.errors import UnusableInputError


def load_instruction_pairs(path: str | Path) -> list[tuple[str, str]]:
    """{instruction, instances: [{input, output}]} per line -> (prompt, response) pairs."""
    path = Path(path)
    if not path.is_file():
        raise UnusableInputError(f"{path}: no such file (sft.instruction_data)")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            instruction = rec["instruction"].strip()
            instances = rec.get("instances") or [{"input": "", "output": rec.get("output", "")}]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise UnusableInputError(
                f"{path}:{lineno}: expected an object with 'instruction' and 'instances'"
            ) from None
        for inst in instances:
            given, output = (inst.get("input") or "").strip(), (inst.get("output") or "").strip()
            if output:
                pairs.append((f"{instruction}\n\n{given}" if given else instruction, output))
    if not pairs:
        raise UnusableInputError(f"{path}: no instruction with an output")
    return pairs
