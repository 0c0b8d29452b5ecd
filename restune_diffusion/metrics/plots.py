"""Plots of result rows, for every protocol: a metric against another over guidance scales (one curve per model), and
metrics against the training step (one curve per run, per-checkpoint mode). Rows are eval.json's rows; an axis is
(label, getter).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..files import atomic_write

Axis = tuple[str, Callable[[dict], float | None]]  # (axis label, row -> value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_sweep(rows: list[dict], path: Path, x: Axis, y: Axis, title: str) -> Path:
    """One curve per model over its guidance scales (each point annotated with its scale): y against x."""
    fig, ax = _pyplot().subplots(figsize=(5, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["guidance_scale"])
        xs, ys = [x[1](r) for r in mine], [y[1](r) for r in mine]
        ax.plot(xs, ys, marker="o", label=model)
        for px, py, r in zip(xs, ys, mine):
            ax.annotate(f"{r['guidance_scale']:g}", (px, py), fontsize=7)
    ax.set_xlabel(x[0])
    ax.set_ylabel(y[0])
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def run_of(row: dict) -> str:
    """The training run a checkpoint row belongs to: the folder above its checkpoint-N folder."""
    return Path(row["tuners"]).parent.parent.name


def plot_vs_step(rows: list[dict], path: Path, metrics: list[Axis], title: str) -> Path:
    """Per-checkpoint mode: one panel per metric, one curve per run (and guidance scale, when several) with one point
    per checkpoint; the untuned base, when evaluated, as a dashed line."""
    scales = sorted({r["guidance_scale"] for r in rows})
    fig, axes = _pyplot().subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (label, value) in zip(axes[0], metrics):
        for scale in scales:
            suffix = f" (cfg {scale:g})" if len(scales) > 1 else ""
            at_scale = [r for r in rows if r["guidance_scale"] == scale]
            for r in (r for r in at_scale if r["step"] is None):
                ax.axhline(value(r), linestyle="--", color="gray", label=f"{r['model']}{suffix}")
            checkpoints = [r for r in at_scale if r["step"] is not None]
            for run in dict.fromkeys(run_of(r) for r in checkpoints):
                mine = sorted((r for r in checkpoints if run_of(r) == run), key=lambda r: r["step"])
                ax.plot([r["step"] for r in mine], [value(r) for r in mine], marker="o", label=f"{run}{suffix}")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
