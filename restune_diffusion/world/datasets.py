"""A concept's images in the folder formats users have: imagefolder + metadata.jsonl, class folders, COCO layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import atomic_write, atomic_write_text
from .scene import CONCEPTS, RESOLUTION, Attributes, concept_examples, render

CONCEPT = "star"  # the default job's concept
CONCEPT_TRAIN_N = 64  # a concept's training set: what a user would bring for a new concept


def _save(path: Path, attrs: Attributes) -> None:
    atomic_write(path, lambda tmp: render(attrs).save(tmp, format="PNG"))


def write_imagefolder(out: str | os.PathLike, attrs: list[Attributes]) -> Path:
    """`out/00000.png ...` + `metadata.jsonl` ({"file_name", "text"}), the diffusers imagefolder layout."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, a in enumerate(attrs):
        _save(root / f"{i:05d}.png", a)
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": a.caption}))
    atomic_write_text(root / "metadata.jsonl", "\n".join(lines) + "\n")
    return root


def write_class_folders(out: str | os.PathLike, attrs: list[Attributes]) -> Path:
    """`out/<colour> <shape>/00000.png`: the fine-grained class-folder layout (captions come from the template)."""
    root = Path(out)
    for i, a in enumerate(attrs):
        folder = root / f"{a.colour} {a.shape}"
        folder.mkdir(parents=True, exist_ok=True)
        _save(folder / f"{i:05d}.png", a)
    return root


def write_coco_layout(out: str | os.PathLike, attrs: list[Attributes], split: str = "train") -> Path:
    """`out/{split}2017/<id>.png` named like COCO's, with `annotations/captions_{split}2017.json`."""
    root = Path(out)
    images_dir = root / f"{split}2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, a in enumerate(attrs):
        name = f"{i + 1:012d}.png"
        _save(images_dir / name, a)
        images.append({"id": i + 1, "file_name": name, "width": RESOLUTION, "height": RESOLUTION})
        annotations.append({"id": i + 1, "image_id": i + 1, "caption": a.caption})
    (root / "annotations").mkdir(exist_ok=True)
    atomic_write_text(root / "annotations" / f"captions_{split}2017.json",
                      json.dumps({"images": images, "annotations": annotations}))
    return root


def concept_train_set(concept: str = CONCEPT, n: int = CONCEPT_TRAIN_N) -> list[Attributes]:
    return concept_examples("concept_train", concept, n)


def use_concept_data(args) -> None:
    """For `world_report: true`: the concept's training set (`world_concept`, default the star) is the run's data.
    Writes it as an imagefolder to `--data_dir` (default <output_dir>/concept_data) unless one is already there."""
    if args.dataset != "imagefolder":
        raise ValueError(f"world_report: the concept is written as an imagefolder; expected dataset: imagefolder, "
                         f"got {args.dataset!r}")
    concept = getattr(args, "world_concept", None) or CONCEPT
    if concept not in CONCEPTS:
        raise ValueError(f"world_concept: expected one of {CONCEPTS}, got {concept!r}")
    args.data_dir = args.data_dir or os.path.join(args.output_dir, "concept_data")
    if not (Path(args.data_dir) / "metadata.jsonl").is_file():
        write_imagefolder(args.data_dir, concept_train_set(concept))


def write_concept_datasets(out: str | os.PathLike, concept: str = CONCEPT, n_train: int = CONCEPT_TRAIN_N,
                           n_heldout: int = 64) -> dict[str, Path]:
    """A concept's train and held-out sets in all three layouts under `out`."""
    root = Path(out)
    paths = {}
    for split, n in (("concept_train", n_train), ("concept_heldout", n_heldout)):
        attrs = concept_examples(split, concept, n)
        name = split.removeprefix("concept_")
        paths[f"{name}_imagefolder"] = write_imagefolder(root / name / "imagefolder", attrs)
        paths[f"{name}_classes"] = write_class_folders(root / name / "classes", attrs)
        paths[f"{name}_coco"] = write_coco_layout(root / name / "coco", attrs, split="train" if name == "train"
                                                  else "val")
    return paths
