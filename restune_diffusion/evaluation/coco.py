"""The COCO caption protocol: which captions are drawn, which real images the statistics use.

- Data: COCO2014 or COCO2017 (`--coco_year`), split val by default: `annotations/captions_{split}{year}.json` and
  `{split}{year}/` under the COCO root. Images sorted by id; each image's captions in annotation-id order.
- N <= images in the split: N distinct images drawn without replacement (seeded), one caption each (seeded per
  image position, so an image keeps its caption whatever subset is drawn). Real statistics: those N images.
- N > images in the split (FID-10K/30K on val2017's 5,000): every image once with its caption, then N - M further
  (image, caption) pairs drawn uniformly WITH replacement from all of the split's (image, caption) pairs (seeded).
  Real statistics: the whole split, each image once.
- Fake image i uses the seed `seed * 1,000,000 + i` and caption i.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

YEARS = ("2014", "2017")
PROTOCOL_VERSION = "restune-eval-v2"
PROTOCOL = (
    "COCO{year} {split}: N captions; N <= images in the split: N distinct images drawn without replacement, one "
    "caption each; N > images: every image once, the rest drawn with replacement from all (image, caption) pairs; "
    "seeded. Real: the drawn images (N <= split) or the whole split, center crop to square, bicubic PIL resize to "
    "the evaluation resolution. Fake: generated at that resolution, seed * 1e6 + index. Both: bicubic PIL resize "
    "of uint8 images to 299x299, TF-ported FID Inception-v3 (pt_inception-2015-12-05-6726825d.pth) on "
    "(x - 128) / 128, pool3 2048-d features, float64 statistics and Frechet distance by torchmetrics, TF32 off; "
    "KID (torchmetrics' kernel and subset draws, float64) on the same features. CLIP score: "
    "100 * max(cos(image, caption), 0), mean over images. "
    "FID at N < 5,000 is biased upward and comparable only at equal N; N < 2,048 gives a rank-deficient covariance."
)


@dataclass(frozen=True)
class CocoDraw:
    """The protocol's draw: N (real image path, caption) pairs for generation, and the real images of the stats."""

    pairs: list[tuple[Path, str]]
    real_images: list[Path]
    num_images_in_split: int
    with_replacement: int  # how many pairs beyond the split were drawn with replacement


def read_captions(coco_dir: str | os.PathLike, year: str = "2017", split: str = "val") -> list[tuple[Path, list[str]]]:
    """[(image path, captions)] sorted by image id; named errors for a missing or malformed file."""
    if year not in YEARS:
        raise ValueError(f"--coco_year: expected one of {YEARS}, got {year!r}")
    root = Path(coco_dir)
    ann = root / "annotations" / f"captions_{split}{year}.json"
    image_dir = root / f"{split}{year}"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: COCO captions file not found (expected the COCO{year} layout under "
                                f"{root}: annotations/captions_{split}{year}.json and {split}{year}/)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: COCO{year} {split} image folder not found")
    try:
        data = json.loads(ann.read_text(encoding="utf-8"))
        captions: dict[int, list[str]] = {}
        for a in sorted(data["annotations"], key=lambda a: a["id"]):
            if isinstance(a.get("caption"), str) and a["caption"].strip():
                captions.setdefault(a["image_id"], []).append(a["caption"].strip())
        images = sorted(data["images"], key=lambda im: im["id"])
        found = [(image_dir / im["file_name"], captions[im["id"]]) for im in images if captions.get(im["id"])]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{ann}: expected COCO captions JSON {{'images': [{{'id', 'file_name'}}], 'annotations': "
                         f"[{{'id', 'image_id', 'caption'}}]}} ({type(err).__name__}: {err})") from None
    if not found:
        raise ValueError(f"{ann}: no image with a caption")
    return found


def draw(coco_dir: str | os.PathLike, num_samples: int, seed: int = 0, year: str = "2017",
         split: str = "val") -> CocoDraw:
    """The protocol's N (image, caption) pairs (see the module docstring)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"--num_samples: expected a positive integer, got {num_samples!r}")
    images = read_captions(coco_dir, year, split)
    m = len(images)

    def caption(i: int) -> str:  # image i's caption depends on its position only
        options = images[i][1]
        return options[int(np.random.default_rng([seed, i]).integers(len(options)))]

    if num_samples <= m:
        chosen = sorted(np.random.default_rng(seed).choice(m, num_samples, replace=False).tolist())
        pairs = [(images[i][0], caption(i)) for i in chosen]
        return CocoDraw(pairs, [p for p, _ in pairs], m, 0)
    pairs = [(images[i][0], caption(i)) for i in range(m)]
    every = [(path, text) for path, texts in images for text in texts]
    extra = np.random.default_rng([seed, 1]).integers(len(every), size=num_samples - m)
    pairs += [every[int(j)] for j in extra]
    return CocoDraw(pairs, [path for path, _ in images], m, num_samples - m)
