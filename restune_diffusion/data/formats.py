"""Data set layouts -> `Sample(path, captions)` lists: COCO 2017 captions, fine-grained class folders, image folders
with metadata.jsonl/.csv. Problems are named errors (or counted with --skip_bad_images, `ScanReport.flag`)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_EXTENSIONS, SKIP_HINT

DEFAULT_TEMPLATE = "a photo of a {class}, a type of {category}"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# WordNet synset ids lead Stanford Dogs / ImageNet folder names: n02085620-Chihuahua
WORDNET_PREFIX = re.compile(r"^n\d{8}[-_\s]+")
# words whose first letter misleads the article: "a university", "an hour"
CONSONANT_SOUND = ("uni", "use", "usu", "uti", "eu", "ewe", "one", "once", "ubiq", "ufo")
VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")
# a capital followed by a digit, - or /, or 2-3 capitals alone: read as letters (aircraft variants, car makers)
INITIALISM = re.compile(r"[A-Z](?:[\d\-/]|[A-Z]{1,2}(?![A-Za-z]))")
LETTERS_WITH_VOWEL_SOUND = "aefhilmnorsx"  # "an F", "an M", "an S"


@dataclass
class Sample:
    path: Path
    captions: list[str]  # one caption is drawn per (seed, epoch, index) when there are several
    size: tuple[int, int] | None = None  # (w, h) with EXIF orientation applied, from the scan (what buckets use)


@dataclass
class ScanReport:
    """What the start-up scan found: where captions came from, how many samples, what was dropped and why."""

    kind: str
    data_dir: str
    source: str = ""  # the metadata / annotations file, or "class folder names"
    columns: str = ""  # which fields gave image and caption
    num_samples: int = 0
    num_images: int = 0
    num_without_caption: int = 0
    num_unreadable: int = 0
    skip_bad_images: bool = False
    scan_mode: str = "decode"
    num_decoded: int = 0  # images read at this scan (the rest came from the scan cache)
    num_listed: int = 0  # samples before --max_train_samples
    max_train_samples: int | None = None
    dropped: list[str] = field(default_factory=list)  # the first few messages of dropped samples
    derived_captions: dict[str, int] = field(default_factory=dict)  # caption -> samples, when made from folder names

    def flag(self, problem: str, message: str) -> None:
        """Raise `message`, or with skip_bad_images count the problem ("caption" or "image") and go on."""
        if not self.skip_bad_images:
            raise ValueError(message)
        if problem == "caption":
            self.num_without_caption += 1
        else:
            self.num_unreadable += 1
        if len(self.dropped) < 5:
            self.dropped.append(message)

    def summary(self) -> str:
        """A few lines for the log: source, columns, counts, the derived captions and what was dropped."""
        checked = {"decode": "every image decoded", "header": "image headers checked (decoded at load)"}
        lines = [
            f"dataset {self.kind} at {self.data_dir}",
            f"  captions from {self.source} ({self.columns})",
            f"  {self.num_samples} samples, {self.num_images} images"
            + (f" (--max_train_samples {self.max_train_samples} of {self.num_listed}, seeded)"
               if self.max_train_samples is not None and self.max_train_samples < self.num_listed else "")
            + f"; {checked.get(self.scan_mode, self.scan_mode)}"
            f" ({self.num_decoded} read now, the rest from the scan cache)",
            f"  {self.num_without_caption} without caption, {self.num_unreadable} unreadable images"
            + (" (dropped: --skip_bad_images)" if self.num_without_caption + self.num_unreadable else ""),
        ]
        if self.derived_captions:
            common = sorted(self.derived_captions.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(f"  {len(common)} captions derived from class names, e.g. "
                         + "; ".join(f"{c!r} x{n}" for c, n in common[:3]))
        return "\n".join(lines + [f"  dropped: {m}" for m in self.dropped])


# ---------------------------------------------------------------------------------------------------------------------
def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (hidden entries skipped); symlinked folders are followed, a loop is an error."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            raise ValueError(f"{top}: a symlink loop (this folder is already part of {folder}); remove the link")
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def _read_json(path: Path, expected: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found. Expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}). Expected {expected}") from err


def outside(name: str) -> bool:
    """Whether a file name from a metadata file leaves its folder (absolute, or `..` after normalising)."""
    norm = os.path.normpath(name)
    return os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../")


def coco_samples(root: Path, split: str, report: ScanReport) -> list[Sample]:
    ann_path = root / "annotations" / f"captions_{split}2017.json"
    expected = ("the COCO 2017 captions file: {'images': [{'id', 'file_name'}], "
                "'annotations': [{'image_id', 'caption'}]}")
    data = _read_json(ann_path, expected)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{ann_path}: missing 'images' or 'annotations' list. Expected {expected}")  # noqa: TRY004
    report.source, report.columns = str(ann_path), "images[].file_name, annotations[].caption"
    image_dir = root / f"{split}2017"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found. Expected the COCO {split}2017 images there")
    present = set(os.listdir(image_dir))  # one listing instead of 118k stat calls
    captions: dict[int, list[str]] = {}
    try:
        repeated = [(i, n) for i, n in Counter(im["id"] for im in data["images"]).items() if n > 1]
        if repeated:
            raise ValueError(f"{ann_path}: {len(repeated)} image id(s) appear more than once in 'images' (e.g. id "
                             f"{repeated[0][0]} x{repeated[0][1]}); expected unique ids, as COCO has")
        for k, ann in enumerate(sorted(data["annotations"], key=lambda a: a.get("id", 0))):
            text = ann.get("caption")
            text = text.strip() if isinstance(text, str) else ""
            if not text:
                report.flag("caption", f"{ann_path}: annotations[{k}] (id {ann.get('id')}, image_id "
                            f"{ann.get('image_id')}) has an empty caption. Fix it or pass --skip_bad_images")
                continue
            captions.setdefault(ann["image_id"], []).append(text)
        samples = []
        for img in sorted(data["images"], key=lambda im: im["id"]):
            name = img["file_name"]
            if not isinstance(name, str) or outside(name):
                raise ValueError(f"{ann_path}: image id {img['id']} has file_name {name!r}, outside {image_dir}; "
                                 "expected a name inside it")
            path = image_dir / name
            if not captions.get(img["id"]):
                report.flag("caption", f"{ann_path}: image id {img['id']} ({name}) has no caption")
            elif name not in present and not path.is_file():
                report.flag("image", f"{path}: cannot read image (file missing). {SKIP_HINT}")
            else:
                samples.append(Sample(path, captions[img["id"]]))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{ann_path}: malformed entry ({err!r}). Expected {expected}") from err
    return samples


def clean_class_name(name: str) -> str:
    """`001.Black_footed_Albatross` -> `black footed albatross`, `n02085620-Chihuahua` -> `chihuahua`: drop numeric
    and WordNet-id prefixes, _/- to spaces, lower case."""
    name = WORDNET_PREFIX.sub("", name)
    name = re.sub(r"^\d+[.\-_\s]*", "", name)
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def fix_articles(text: str) -> str:
    """"a acura rl sedan" -> "an acura rl sedan", "an bird" -> "a bird" (by sound for a few known words)."""

    def article(match: re.Match) -> str:
        word = match.group(2).lower()
        if INITIALISM.match(match.group(2)):  # said letter by letter: "an F-16", "an MD-80", "a DC-9", "an A320"
            vowel = word[0] in LETTERS_WITH_VOWEL_SOUND
        else:
            vowel = (word[0] in "aeiou" and not word.startswith(CONSONANT_SOUND)) or word.startswith(VOWEL_SOUND)
        chosen = "an" if vowel else "a"
        return (chosen.capitalize() if match.group(1)[0].isupper() else chosen) + " " + match.group(2)

    return re.sub(r"\b([Aa]n?) ([A-Za-z][\w\-/]*)", article, text)


def _find_metadata(root: Path) -> Path:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    near = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".json", ".jsonl", ".csv", ".txt"))
    raise ValueError(f"{root}: no metadata.jsonl or metadata.csv, so the images have no captions"
                     f" (found {near or 'no metadata-like file'}). Expected {root / 'metadata.jsonl'} with lines like"
                     ' {"file_name": "0001.png", "text": "a caption"}, or a caption file beside each image'
                     " (0001.png + 0001.txt, kohya's layout)")


def _metadata_rows(meta: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of metadata.jsonl or metadata.csv."""
    expected = 'one JSON object per line like {"file_name": "0001.png", "text": "a caption"}'
    try:
        text = meta.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{meta}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, row) for row in reader]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}: line {n} is not valid JSON ({err}). Expected {expected}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{meta}: line {n} is a {type(row).__name__}. Expected {expected}")  # noqa: TRY004
        rows.append((n, row))
    if not rows:
        raise ValueError(f"{meta}: no rows. Expected {expected}")
    return rows


def _as_captions(value) -> list[str]:
    values = value if isinstance(value, list) else [value]  # HF imagefolder allows a list of captions per image
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def imagefolder_samples(root: Path, caption_column: str, image_column: str, report: ScanReport) -> list[Sample]:
    meta = _find_metadata(root)
    rows = _metadata_rows(meta)
    if rows and image_column == "image" and "image" not in rows[0][1] and "file_name" in rows[0][1]:
        image_column = "file_name"  # HF imagefolder loads file_name as "image": diffusers' --image_column image
    report.source, report.columns = str(meta), f"image={image_column!r}, caption={caption_column!r}"
    samples, listed = [], set()
    for n, row in rows:
        for what, col in (("caption_column", caption_column), ("image_column", image_column)):
            if col not in row:
                raise ValueError(f"{meta}: line {n} has no column {col!r}; columns present: {sorted(row)}. "
                                 f"Pass {what}= (--{what}) naming the right one")
        name = str(row[image_column])
        if outside(name):
            raise ValueError(f"{meta}: line {n} has {image_column} {name!r}, outside {root}; expected a path inside it")
        path = root / name
        listed.add(os.path.normpath(path))
        captions = _as_captions(row[caption_column])
        if not captions:
            report.flag("caption", f"{meta}: line {n} ({name}) has an empty {caption_column!r}. "
                        "Write a caption or pass --skip_bad_images to drop it")
        elif not path.is_file():
            report.flag("image", f"{path}: cannot read image (listed in {meta} line {n}, file missing). {SKIP_HINT}")
        else:
            samples.append(Sample(path, captions))
    for path in image_files(root):  # images the metadata forgot would silently train on nothing
        if os.path.normpath(path) not in listed:
            report.flag("caption", f"{path}: image has no caption ({meta.name} does not list it). "
                        "Add a line for it or pass --skip_bad_images")
    return samples
