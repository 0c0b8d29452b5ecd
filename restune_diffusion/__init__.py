"""restune-diffusion: Res-Tuning and Res-Tuning-Bypass (arXiv 2310.19859) for Stable Diffusion v1.5."""

import logging as _logging

# transformers suggests installing torchvision when a pipeline imports CLIPImageProcessor; we never use it (and it
# has no build for the CPU torch): drop only that line, every other transformers warning stays
_logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)

# eager: `attach` is also the name of its module, which would shadow a lazily imported function
from restune_diffusion.attach import attach, attached_sets
from restune_diffusion.version import __version__
from restune_diffusion.weights import load_tuners, save_tuners

# the rest on first use (diffusers/transformers imports are slow)
_LAZY = {
    "load_pipeline": "restune_diffusion.generate",
    "generate_images": "restune_diffusion.generate",
    "load_model": "restune_diffusion.models",
    "load_sd15": "restune_diffusion.models",
    "build_tiny_sd": "restune_diffusion.models",
    "set_tuner_weights": "restune_diffusion.mixing",
}
__all__ = sorted(["attach", "attached_sets", "load_tuners", "save_tuners", *_LAZY])


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'restune_diffusion' has no attribute {name!r}")
