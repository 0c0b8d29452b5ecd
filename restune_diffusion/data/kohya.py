"""The folder layout kohya's sd-scripts (and OneTrainer, SimpleTuner) users bring (issue 27): images with a caption
file beside each (`dog1.png` + `dog1.txt`), either loose in the data folder or in repeat folders named `N_name`
(`10_mydog/`: every image in it is seen 10 times an epoch).

As in kohya: the images of a repeat folder are those directly inside it (sub-folders are not read); an image without
a caption file takes the folder's name after the count as its caption (`10_sks dog` -> "sks dog") when no image of
that folder has a caption file. Where some do, a missing one is an error naming the image (a mix would silently
train on two kinds of caption), as is a folder without a count or an empty caption file. Each non-empty line of a
caption file is a caption (one drawn per epoch, as COCO's five; `--caption_mode first` takes the first line only,
which is what kohya does without `--enable_wildcard`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .formats import Sample, ScanReport
from .images import IMAGE_EXTENSIONS

CAPTION_EXTENSIONS = (".txt", ".caption")  # looked for in this order when --caption_extension is not given
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


def _extensions(caption_extension: str | None) -> tuple[str, ...]:
    if caption_extension is None:
        return CAPTION_EXTENSIONS
    if not isinstance(caption_extension, str) or not caption_extension.strip("."):
        raise ValueError(f"--caption_extension must be a file extension such as .txt, got {caption_extension!r}")
    return (caption_extension if caption_extension.startswith(".") else "." + caption_extension,)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def caption_file(image: Path, extensions: tuple[str, ...]) -> Path | None:
    """The caption file beside `image` (`dog1.png` -> `dog1.txt`), or None."""
    for ext in extensions:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def has_sidecar_captions(folder: Path, caption_extension: str | None = None) -> bool:
    """Whether some image directly in `folder` has a caption file beside it."""
    extensions = _extensions(caption_extension)
    return any(caption_file(p, extensions) is not None for p in _images_in(folder))


def is_kohya_layout(root: Path, caption_extension: str | None = None) -> bool:
    """Loose images with caption files beside them, or sub-folders named like `10_mydog`."""
    if has_sidecar_captions(root, caption_extension):
        return True
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(folders) and any(REPEAT_FOLDER.match(d.name) for d in folders)


def read_caption(path: Path) -> list[str]:
    """The non-empty lines of a caption file, stripped."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _folder_samples(folder: Path, repeats: int, fallback: str, extensions, report: ScanReport) -> list[Sample]:
    images = _images_in(folder)
    files = [caption_file(p, extensions) for p in images]
    shown = "/".join(extensions)
    samples = []
    for image, file in zip(images, files):
        if file is not None:
            captions = read_caption(file)
            if not captions:
                report.flag("caption", f"{file}: empty caption file (for {image.name}). Write a caption or pass "
                            "--skip_bad_images to drop the image")
                continue
        elif fallback and not any(files):
            captions = [fallback]
        else:
            report.flag("caption", f"{image}: image has no caption file ({image.with_suffix(extensions[0]).name}; "
                        f"looked for {shown}). Write one or pass --skip_bad_images")
            continue
        samples += [Sample(image, captions)] * repeats
    return samples


def kohya_samples(root: Path, caption_extension: str | None, report: ScanReport) -> list[Sample]:
    """Samples of a kohya-layout folder: each image repeated by its folder's count, captions from the files beside
    the images (or the folder's name). `report.columns` lists the folders with their images and repeats."""
    extensions = _extensions(caption_extension)
    report.source = f"caption files ({'/'.join('*' + e for e in extensions)}) beside the images"
    samples = _folder_samples(root, 1, "", extensions, report)
    parts = [f"{len(samples)} loose images x1"] if samples else []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        match = REPEAT_FOLDER.match(folder.name)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"{folder}: a folder without a repeat count in a kohya-layout data set; expected a name "
                             f"like 10_{folder.name} (N_name: N >= 1 repeats per epoch). Rename it or move it out")
        repeats, name = int(match.group(1)), match.group(2).strip()
        found = _folder_samples(folder, repeats, name, extensions, report)
        parts.append(f"{folder.name}: {len(found) // repeats} images x{repeats}")
        samples += found
    report.columns = "; ".join(parts)
    if not samples and not report.dropped:
        raise ValueError(f"{root}: no images found in the kohya layout (images with {'/'.join(extensions)} caption "
                         "files, loose or in N_name folders)")
    return samples


# the data flags kohya users bring, buckets and captions (same names and meaning), declared here as (name, argparse
# keywords) entries so that the training options add them to their flag list and hand them to load_dataset by name
# (KOHYA_DATA_KEYS)
KOHYA_FLAGS: tuple[tuple[str, dict], ...] = (
    ("--enable_bucket", dict(action=argparse.BooleanOptionalAction, default=False, help="aspect-ratio buckets: each "
                             "image resized to the bucket nearest its aspect ratio, one bucket per batch "
                             "(data/buckets.py)")),
    ("--min_bucket_reso", dict(type=int, help="smallest bucket side (default: resolution / 2)")),
    ("--max_bucket_reso", dict(type=int, help="largest bucket side (default: 2 x resolution)")),
    ("--bucket_reso_steps", dict(type=int, help="bucket sides are multiples of this (default 64, at most resolution "
                                 "/ 4)")),
    ("--caption_extension", dict(help="kohya layout: the caption file beside each image (default: .txt, else "
                                 ".caption)")),
    ("--shuffle_caption", dict(action=argparse.BooleanOptionalAction, default=False, help="shuffle the "
                               "comma-separated tags of each caption every epoch (the first --keep_tokens stay in "
                               "front)")),
    ("--keep_tokens", dict(type=int, default=0, help="tags at the start of a caption kept in place")),
    ("--caption_tag_dropout_rate", dict(type=float, default=0.0, help="drop each tag (except the kept ones) with "
                                        "this probability")),
    ("--keep_tokens_separator", dict(help="e.g. '|||': the tags before it are kept in place (instead of "
                                     "--keep_tokens); those after a second one stay at the end")))
KOHYA_DATA_KEYS = tuple(name.removeprefix("--") for name, _ in KOHYA_FLAGS)
