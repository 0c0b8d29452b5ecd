"""The tuner registry: name -> (config dataclass, install(unet, config, handle)), and tuner configs parsed with it.

Adding a tuner = one new file + one line here.

Unbound Res-Tuners (the paper's): res_adapter, res_prefix, res_prompt. Bound baselines: full, lora, adapter, prefix,
prompt. Beside the backbone: bypass (Res-Tuning-Bypass), sc_tuner (SCEdit's skip-connection tuner). Baselines built by
peft (peft_layers.py): dora, loha, lokr, oft.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from restune_diffusion.config import from_dict, load_yaml
from restune_diffusion.tuners import (
    adapter,
    bypass,
    dora,
    full,
    loha,
    lokr,
    lora,
    oft,
    prefix,
    prompt,
    res_adapter,
    res_prefix,
    res_prompt,
    sc_tuner,
)


class TunerKind(NamedTuple):
    config: type
    install: Callable


def _kind(module, config) -> tuple[str, TunerKind]:
    return config.type, TunerKind(config, module.install)


REGISTRY: dict[str, TunerKind] = dict([
    _kind(res_adapter, res_adapter.ResAdapterConfig),
    _kind(res_prefix, res_prefix.ResPrefixConfig),
    _kind(res_prompt, res_prompt.ResPromptConfig),
    _kind(adapter, adapter.AdapterConfig),
    _kind(lora, lora.LoraConfig),
    _kind(prefix, prefix.PrefixConfig),
    _kind(prompt, prompt.PromptConfig),
    _kind(full, full.FullConfig),
    _kind(bypass, bypass.BypassConfig),
    _kind(sc_tuner, sc_tuner.SCTunerConfig),
    _kind(dora, dora.DoraConfig),
    _kind(loha, loha.LohaConfig),
    _kind(lokr, lokr.LokrConfig),
    _kind(oft, oft.OftConfig),
])


def parse_tuner_config(entry: Any, field: str = "tuners[0]"):
    """One `tuners:` entry (a mapping with `type`, or a config dataclass) -> its validated config dataclass."""
    if dataclasses.is_dataclass(entry) and hasattr(entry, "type"):
        return entry
    if not isinstance(entry, dict) or "type" not in entry:
        raise ValueError(f"{field}: expected a mapping with a 'type' key (one of {sorted(REGISTRY)}), got {entry!r}")
    kind = entry["type"]
    if kind not in REGISTRY:
        raise ValueError(f"{field}.type: unknown tuner {kind!r}; known tuners are {sorted(REGISTRY)}")
    body = {k: v for k, v in entry.items() if k != "type"}
    try:
        return from_dict(REGISTRY[kind].config, body, field)
    except ValueError as err:
        raise ValueError(f"{field} ({kind}): {err}") from None


def parse_tuner_configs(config: Any) -> list:
    """A YAML path, a dict with `tuners:`, a list of entries, or one entry/dataclass -> list of tuner configs."""
    where = "tuners"
    if isinstance(config, (str, os.PathLike)):
        where = f"{config}: tuners"
        config = load_yaml(config)
    if isinstance(config, dict) and "tuners" in config:
        config = config["tuners"]
    if not isinstance(config, (list, tuple)):
        config = [config]
    if not config:
        raise ValueError(f"{where}: expected at least one tuner")
    return [parse_tuner_config(entry, f"{where}[{i}]") for i, entry in enumerate(config)]


def to_dicts(configs: list) -> list[dict]:
    """Tuner configs as plain dicts with their `type` (what goes into a weights file's metadata)."""
    return [{"type": c.type, **dataclasses.asdict(c)} for c in configs]
