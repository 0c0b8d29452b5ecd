"""Hugging Face `datasets` data sets (`--dataset_name`, diffusers' flag; issue 17): a folder written by
`save_to_disk`, a folder of parquet/arrow files, or a hub id already in the local datasets cache. Nothing is
downloaded: offline mode is forced, and a name that is not found locally is an error saying where we looked.

The rows of the chosen split are written out once into an image folder with metadata.jsonl (the image bytes as the
data set holds them, PIL images as PNG), under `<HF_DATASETS_CACHE>/restune_images/<name>-<split>-<fingerprint>/`,
and read like any image folder: the scan and its cache, the latent cache and the data fingerprint work unchanged, and
a second run finds the folder made. `datasets` is an optional extra (pip install -e '.[datasets]').
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from ..files import ordinary_mode
from .images import PIL_ERRORS

INSTALL = "pip install datasets (or pip install -e '.[datasets]')"
EXPORT_DIR = "restune_images"
_DONE = "export.json"  # written last: its presence means the folder is complete
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict / a Dataset)


def import_datasets():
    """The `datasets` module in offline mode, or a named error with the install command."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when datasets is first imported
    try:
        import datasets
    except ImportError:
        raise ImportError(f"--dataset_name needs the datasets package: {INSTALL}") from None
    datasets.config.HF_HUB_OFFLINE = True  # in case it was imported before
    return datasets


def open_split(name_or_path: str, split: str = "train", config_name: str | None = None):
    """The split of a local data set as a `datasets.Dataset`; errors name the data set and what was found."""
    datasets = import_datasets()
    path = Path(name_or_path)
    try:
        if path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        else:  # a folder of parquet/arrow/... files, or a hub id in the cache
            loaded = datasets.load_dataset(name_or_path, config_name)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; one line names the cause
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        where = "a local folder" if path.exists() else f"the local datasets cache ({datasets.config.HF_DATASETS_CACHE})"
        raise FileNotFoundError(
            f"--dataset_name {name_or_path}: cannot load it from {where}; expected a save_to_disk folder, a folder of "
            f"parquet/arrow files, or a hub id loaded once before (nothing is downloaded here). datasets said: "
            f"{type(err).__name__}: {first}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--dataset_name {name_or_path}: no split {split!r}; it has {sorted(loaded)}. "
                             "Pass --split with one of them")
        return loaded[split]
    if split != "train":
        raise ValueError(f"--dataset_name {name_or_path}: holds one split (a Dataset, not a DatasetDict); "
                         f"--split {split} cannot be chosen, drop it")
    return loaded


def arrow_files(ds) -> list:
    """The data set's version from its public surface: its arrow files (name, size, mtime); a rewritten set
    differs, the same files do not."""
    found = []
    for entry in ds.cache_files:
        stat = os.stat(entry["filename"])
        found.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
    return found


def _image_bytes(value, base: Path) -> bytes:
    """A row's image as encoded bytes: a PIL image (as PNG), a {bytes, path} dict, or a path."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, str) and path:
        file = Path(path) if os.path.isabs(path) else base / path
        return file.read_bytes()
    raise ValueError(f"expected a PIL image, a {{'bytes', 'path'}} dict or a path, got {type(value).__name__}")


def _suffix(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _SUFFIX.get(im.format, ".png")
    except PIL_ERRORS:
        return ".png"  # unreadable: the scan names the written file and its problem


def _caption(value, feature) -> str | list[str]:
    if hasattr(feature, "int2str") and isinstance(value, int):  # a ClassLabel column
        return feature.int2str(value)
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return value if isinstance(value, str) else ("" if value is None else str(value))


def check_columns(ds, name: str, image_column: str, caption_column: str) -> None:
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in ds.column_names:
            raise ValueError(f"--dataset_name {name}: no column {column!r} ({flag}); columns: {ds.column_names}")


def export_images(name_or_path: str, split: str = "train", config_name: str | None = None,
                  image_column: str = "image", caption_column: str = "text",
                  out_root: str | os.PathLike | None = None) -> tuple[Path, int]:
    """(an image folder with metadata.jsonl holding the split's rows, rows in it). Made once per data set version
    (the datasets fingerprint), split and columns; written to a temp folder then renamed."""
    datasets = import_datasets()
    ds = open_split(name_or_path, split, config_name)
    check_columns(ds, name_or_path, image_column, caption_column)
    key = json.dumps([str(name_or_path), config_name, split, arrow_files(ds), image_column, caption_column, len(ds)])
    slug = re.sub(r"[^\w.-]+", "_", Path(str(name_or_path).rstrip("/")).name or "dataset")[:60]
    root = Path(out_root) if out_root is not None else Path(datasets.config.HF_DATASETS_CACHE) / EXPORT_DIR
    folder = root / f"{slug}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / _DONE).is_file():
        return folder, len(ds)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    ordinary_mode(tmp, folder=True)
    base = Path(name_or_path) if Path(name_or_path).is_dir() else Path.cwd()
    if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # the stored bytes, not decoded images
    feature = ds.features.get(caption_column)
    try:
        lines = []
        for i, row in enumerate(ds.select_columns([image_column, caption_column])):
            try:
                data = _image_bytes(row[image_column], base)
            except (OSError, ValueError) as err:
                raise ValueError(f"--dataset_name {name_or_path}: row {i}, column {image_column!r}: {err}") from None
            file_name = f"{i:08d}{_suffix(data)}"
            (tmp / file_name).write_bytes(data)
            lines.append(json.dumps({"file_name": file_name, "text": _caption(row[caption_column], feature)}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / _DONE).write_text(json.dumps({"dataset": str(name_or_path), "config": config_name, "split": split,
                                             "image_column": image_column, "caption_column": caption_column,
                                             "rows": len(lines)}))
        os.rename(tmp, folder)
    except OSError:
        if not (folder / _DONE).is_file():  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, len(ds)
