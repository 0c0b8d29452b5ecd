"""Config validation helpers and YAML loading: errors that name the field.

A config file has a `tuners:` list (each entry has a `type` from the registry and that tuner's fields) and may have
`train:` / `data:` sections that `train_t2i.py` reads (its flags override them). The tuner files build their config
dataclasses with the helpers here; turning `tuners:` entries into those dataclasses needs the registry, so it lives
with it (`restune_diffusion.tuners.parse_tuner_configs`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("tuners", "train", "data", "eval", "description", "tasks")  # tasks: a joint bypass run (train/joint.py)


def check(condition: bool, field: str, expected: str, got: Any) -> None:
    """Raise `ValueError("field must be <expected>, got <got>")` unless condition holds."""
    if not condition:
        raise ValueError(f"{field} must be {expected}, got {got!r}")


def check_positive_int(value: Any, field: str) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, "a positive int", value)


def check_choice(value: Any, choices, field: str) -> None:
    check(value in choices, field, f"one of {list(choices)}", value)


def check_targets(targets: Any, allowed, field: str) -> None:
    check(isinstance(targets, (list, tuple)) and len(targets) > 0 and all(t in allowed for t in targets),
          field, f"a non-empty list drawn from {list(allowed)}", targets)


def check_blocks(blocks: Any, field: str) -> None:
    ok = isinstance(blocks, str) or (isinstance(blocks, (list, tuple)) and all(isinstance(i, int) for i in blocks))
    check(ok, field, '"all", "down", "mid", "up", a regex on block names, or a list of block positions', blocks)


def from_dict(cls, data: dict, field: str):
    """Build dataclass `cls` from `data`; unknown keys are an error listing the valid ones (peft only warns)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{field}: unknown field(s) {unknown}; valid fields are {names}")
    return cls(**data)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with a 'tuners:' list, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections are {list(SECTIONS)}")
    return data
