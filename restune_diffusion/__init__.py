"""restune-diffusion: Res-Tuning and Res-Tuning-Bypass (arXiv 2310.19859) for Stable Diffusion v1.5."""

__version__ = "0.1.0"
