"""The package version: one place, below every module that records it (weights files, the package itself)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml
