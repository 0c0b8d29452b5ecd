"""Reading images for real (issue 13, items 10-11): decode checks that catch what `verify()` misses, EXIF orientation,
16-bit scaled instead of clipped, transparency composited on white, and a bound on the aspect ratio.

PITFALLS "Images": `verify()` reads headers only (a PNG with corrupt zlib data or a truncated JPEG with an end marker
appended passes); `open()` ignores EXIF orientation; `convert("RGB")` clips 16-bit values to white; a 1x200000 image
passes PIL's bomb guard and explodes at the resize.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SKIP_HINT = "Fix or remove it, or pass --skip_bad_images"
MAX_ASPECT_RATIO = 20.0  # long side / short side; beyond it the short-side resize makes a huge strip
# what PIL raises for missing, corrupt or truncated files (UnidentifiedImageError is an OSError)
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PNG 16-bit grey opens as I;16 (or I in older Pillow)
GREY_128 = 128  # what libjpeg fills missing blocks with (all coefficients zero)
JPEG_TAIL = 4096  # where the end-of-image marker is looked for (after it, some cameras append a few bytes)


class BadImageError(ValueError):
    """An image that cannot be used, with its path and what is wrong in the message."""


def describe(err: Exception) -> str:
    """What went wrong reading an image, the same in every process (PIL names the file object it was given, with
    its address, when it cannot identify a format)."""
    if isinstance(err, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image in a format Pillow reads"
    return f"{type(err).__name__}: {err}"


def size_problem(size: tuple[int, int]) -> str | None:
    """Why an image of `size` (w, h) cannot be used, or None."""
    w, h = size
    if w <= 0 or h <= 0:
        return f"image is {w}x{h}: empty"
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        return (f"image is {w}x{h} (aspect ratio {max(w, h) / min(w, h):.0f}:1); expected at most "
                f"{MAX_ASPECT_RATIO:.0f}:1 (resizing its short side would make a {max(w, h) / min(w, h):.0f}x longer"
                " strip)")
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied, 16-bit scaled to 8-bit, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT:  # convert("RGB") would clip every value above 255 to white
        array = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB (see `to_rgb`); an error names the file."""
    try:
        with Image.open(path) as im:
            problem = size_problem(im.size)
            if problem is None:
                return to_rgb(im)
    except PIL_ERRORS as err:
        raise BadImageError(f"{path}: cannot read image ({describe(err)}). {SKIP_HINT}") from err
    raise BadImageError(f"{path}: {problem}. {SKIP_HINT}")


def _small_jpeg(data: bytes) -> np.ndarray:
    """Decode a JPEG at 1/8 scale: every entropy-coded byte is still read, each 8x8 block becomes its DC value."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", (1, 1))
        im.load()
        return np.asarray(im)


def _jpeg_scan_ends_early(data: bytes, small: np.ndarray) -> bool:
    """A JPEG cut short with its end marker (FF D9) appended decodes without error: libjpeg fills the missing blocks
    with grey 128. When the last block is that grey, decode again with zero bytes put before the end marker: a
    complete scan ignores them, a short one decodes them as coefficients, so the two decodes differ."""
    if small.size == 0 or not np.all(small.reshape(-1, small.shape[-1] if small.ndim == 3 else 1)[-1] == GREY_128):
        return False
    end = data.rfind(b"\xff\xd9")
    if end < 0:
        return True
    try:
        padded = _small_jpeg(data[:end] + b"\x00" * 64 + data[end:])
    except PIL_ERRORS:
        return True
    return not np.array_equal(padded, small)


EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(w, h) as `to_rgb` will give the image (EXIF orientation applied), from the EXIF block open() read with the
    header (JPEG APP1, a PNG eXIf chunk before the pixels); `im.getexif()` would decode a PNG to look further."""
    w, h = im.size
    block = im.info.get("exif")
    if not block:
        return w, h
    try:
        exif = Image.Exif()
        exif.load(block)
        turned = exif.get(EXIF_ORIENTATION) in TRANSPOSED
    except PIL_ERRORS:
        turned = False  # a broken EXIF block: exif_transpose cannot read it either
    return (h, w) if turned else (w, h)


def image_problem(path: Path, decode: bool = True) -> tuple[str | None, tuple[int, int] | None]:
    """(why the image cannot be used or None, its (w, h) with EXIF orientation applied, or None). decode=True reads
    every pixel once (JPEGs at 1/8 scale); decode=False checks the header, PNG checksums and the JPEG end marker
    only."""
    try:
        if not decode:
            return _header_problem(path)
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = oriented_size(im), im.format
            if fmt != "JPEG":
                im.load()  # PNG: inflates every IDAT (corrupt zlib data raises here, not in verify())
        if fmt == "JPEG":
            if b"\xff\xd9" not in data[-JPEG_TAIL:]:
                return "truncated JPEG: no end-of-image marker", size
            if _jpeg_scan_ends_early(data, _small_jpeg(data)):
                return "truncated JPEG: its data ends early (an end marker was appended)", size
    except PIL_ERRORS as err:
        return describe(err), None
    return size_problem(size), size


def _header_problem(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """image_problem(decode=False): a JPEG's header and last JPEG_TAIL bytes are read, not its body (~8 KB of a COCO
    image's ~160 KB: the cold scan of 118k files reads ~1 GB instead of ~19 GB); other formats are verified whole
    (PNG chunk checksums)."""
    with open(path, "rb") as f, Image.open(f) as im:
        size, fmt = oriented_size(im), im.format
        if fmt != "JPEG":
            im.verify()
        else:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - JPEG_TAIL))
            if b"\xff\xd9" not in f.read(JPEG_TAIL):
                return "truncated JPEG: no end-of-image marker", size
    return size_problem(size), size
