"""tools/make_coco_scale.py on a tiny --num_train: the COCO layout our loader reads, deterministic, rerunnable."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from restune_diffusion import data

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_coco_scale.py"


def make(out, *extra):
    subprocess.run([sys.executable, str(TOOL), str(out), "--num_train", "40", "--num_val", "6", *extra], check=True,
                   capture_output=True, text=True)


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_tiny_coco_scale_is_read_by_the_loader_and_deterministic(tmp_path):
    make(tmp_path / "a", "--workers", "2", "--train_captions", "203")
    make(tmp_path / "b", "--workers", "1", "--train_captions", "203")
    ann = json.loads((tmp_path / "a" / "annotations" / "captions_train2017.json").read_text())
    assert len(ann["images"]) == 40 and len(ann["annotations"]) == 203
    files = sorted(p.name for p in (tmp_path / "a" / "train2017").iterdir())
    assert len(files) == 40 and all((tmp_path / "a" / "train2017" / f).read_bytes()
                                    == (tmp_path / "b" / "train2017" / f).read_bytes() for f in files)
    sizes = {(im["width"], im["height"]) for im in ann["images"]}
    assert len(sizes) > 10 and any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    ds = data.load_dataset("coco2017", tmp_path / "a", resolution=16, progress=False)
    assert len(ds) == 40 and ds.report.num_unreadable == 0 and ds[0]["pixel_values"].shape == (3, 16, 16)
    modes = {__import__("PIL.Image").Image.open(tmp_path / "a" / "train2017" / f).mode for f in files}
    assert modes == {"RGB", "L"}
    assert len(data.coco_caption_pairs(tmp_path / "a", "val")) == 6
    mtime = (tmp_path / "a" / "train2017" / files[0]).stat().st_mtime_ns
    make(tmp_path / "a", "--train_captions", "203")  # a rerun keeps the images
    assert (tmp_path / "a" / "train2017" / files[0]).stat().st_mtime_ns == mtime
