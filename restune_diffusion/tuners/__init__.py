"""The tuner registry: name -> (config dataclass, install(unet, config, handle)).

Adding a tuner = one new file + one line here.

Unbound Res-Tuners (the paper's): res_adapter, res_prefix, res_prompt. Bound baselines: full, lora, adapter, prefix,
prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from restune_diffusion.tuners import (
    adapter,
    bypass,
    full,
    lora,
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
])
