"""Samplers by the names A1111 / ComfyUI users know, as diffusers scheduler classes built from the model's config.

"Euler", "Euler a", "UniPC", "DPM++ 2M" and "DPM++ 2M Karras" (any case; spaces, '-' and '_' alike), plus our older
names "ddim", "pndm", "dpm". Karras sigmas: a " Karras" suffix or `karras=True`, for the samplers that have them.
"""

from __future__ import annotations

import inspect
import re

# key -> (diffusers class, config overrides, the name shown in metadata)
SAMPLERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PNDM"),
    "dpm": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
}
KARRAS = "_karras"


def sampler_key(name: str) -> tuple[str, bool]:
    """("euler_a", False) for "Euler a"; ("dpm++_2m", True) for "DPM++ 2M Karras"."""
    key = re.sub(r"[\s\-_]+", "_", name.strip().lower())
    karras = key.endswith(KARRAS)
    key = key[: -len(KARRAS)] if karras else key
    if key not in SAMPLERS:
        shown = sorted({v[2] for v in SAMPLERS.values()} | set(SAMPLERS))
        raise ValueError(f"--scheduler: unknown sampler {name!r}; expected one of {shown} (a ' Karras' suffix adds "
                         f"Karras sigmas where the sampler has them)")
    return key, karras


def make_scheduler(name: str, config, karras: bool = False):
    """The diffusers scheduler for `name`, from the model's scheduler config (its training one, or a sampler's)."""
    import diffusers

    key, suffix = sampler_key(name)
    class_name, overrides, _ = SAMPLERS[key]
    cls = getattr(diffusers, class_name)
    overrides = dict(overrides)
    has_karras = "use_karras_sigmas" in inspect.signature(cls.__init__).parameters
    if (karras or suffix) and not has_karras:
        raise ValueError(f"--scheduler {name}: {class_name} has no Karras sigmas (Euler, UniPC and DPM++ 2M do)")
    if has_karras:  # set either way: a config taken from a Karras sampler must not pass its sigmas on
        overrides["use_karras_sigmas"] = bool(karras or suffix)
    return cls.from_config(config, **overrides)


def sampler_label(name: str, karras: bool = False) -> str:
    """The A1111-style name written into image metadata ("DPM++ 2M Karras")."""
    key, suffix = sampler_key(name)
    return SAMPLERS[key][2] + (" Karras" if karras or suffix else "")
