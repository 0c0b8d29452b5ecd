"""A synthetic captioned demo set: coloured shapes ("a big red circle on a blue background") in TINY_WORDS only."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import ordinary_mode

_DEMO_COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (130, 50, 170), "pink": (245, 150, 190), "white": (245, 245, 245),
    "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (120, 75, 35), "cyan": (40, 210, 220),
}
_DEMO_SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
_DEMO_MARKER = "demo.json"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "star":  # 5 points: outer and inner radius alternate
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.4 * r)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    else:  # cross
        t = r / 3
        draw.rectangle((x0, cy - t, x1, cy + t), fill=color)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=color)


def _demo_image(index: int, resolution: int, seed: int) -> tuple[Image.Image, str]:
    rng = np.random.default_rng([seed, index])
    names = list(_DEMO_COLORS)
    color, background = rng.choice(len(names), 2, replace=False)
    shape, size = _DEMO_SHAPES[rng.integers(len(_DEMO_SHAPES))], ("small", "big")[rng.integers(2)]
    side = int(resolution * (rng.uniform(0.55, 0.85) if size == "big" else rng.uniform(0.25, 0.4)))
    x0, y0 = (int(v) for v in rng.integers(0, resolution - side + 1, size=2))
    image = Image.new("RGB", (resolution, resolution), _DEMO_COLORS[names[background]])
    _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + side, y0 + side), _DEMO_COLORS[names[color]])
    return image, f"a {size} {names[color]} {shape} on a {names[background]} background"


def _demo_spec_in(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _DEMO_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def make_demo_dataset(out_dir: str | os.PathLike, num_images: int = 64, resolution: int = 64, seed: int = 0) -> Path:
    """Coloured shapes captioned "a big red circle on a blue background" (TINY_WORDS only), as an imagefolder with
    metadata.jsonl. Deterministic for a seed; written to a temp folder then renamed; a complete one is reused."""
    out = Path(out_dir)
    spec = {"format": "restune-demo", "version": 1, "num_images": num_images, "resolution": resolution, "seed": seed}
    if _demo_spec_in(out) == spec:
        return out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a demo dataset with {spec} (found {_demo_spec_in(out)}). "
                         "Delete it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    ordinary_mode(tmp, folder=True)  # mkdtemp makes 0700; the folder is an ordinary output
    try:
        lines = []
        for i in range(num_images):
            image, caption = _demo_image(i, resolution, seed)
            image.save(tmp / f"{i:05d}.png")
            lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / _DEMO_MARKER).write_text(json.dumps(spec))  # last: its presence means the folder is complete
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except OSError:
        if _demo_spec_in(out) != spec:  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
