import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restune_diffusion import data
from restune_diffusion.models import TINY_WORDS, build_tiny_sd


def write_image(path, size=(24, 16), color=None, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        array = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    else:
        array = np.broadcast_to(np.array(color, np.uint8), (size[1], size[0], 3)).copy()
    Image.fromarray(array).save(path, format=fmt)
    return path


def write_coco(root, split="train", captions=None):
    """Images ids 3, 1, 2 (out of order on purpose), captions per id."""
    captions = captions or {1: ["one a", "one b", "one c", "one d", "one e"], 2: ["two a"], 3: ["three a", "three b"]}
    images, annotations = [], []
    for image_id in [3, 1, 2]:
        name = f"{image_id:012d}.jpg"
        write_image(root / f"{split}2017" / name, seed=image_id, fmt="JPEG")
        images.append({"id": image_id, "file_name": name, "height": 16, "width": 24})
    for image_id, texts in captions.items():
        for text in texts:
            annotations.append({"id": len(annotations) + 100, "image_id": image_id, "caption": text + " \n"})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"captions_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations[::-1]}))
    return path


def write_imagefolder(root, rows, column="text"):
    for i, _ in enumerate(rows):
        write_image(root / f"{i}.png", seed=i)
    lines = [json.dumps({"file_name": f"{i}.png", column: text}) for i, text in enumerate(rows)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root / "metadata.jsonl"


@pytest.fixture(scope="module")
def tiny_sd():
    return build_tiny_sd(0)


@pytest.fixture
def tiny_vae(tiny_sd):
    return tiny_sd.vae


# ---------------------------------------------------------------------------------------------------------------------
# COCO 2017
def test_coco_pairs_each_image_with_its_own_captions_sorted_by_id(tmp_path):
    write_coco(tmp_path)
    ds = data.load_dataset("coco2017", tmp_path, resolution=8, caption_mode="first")
    assert [os.path.basename(item["path"]) for item in ds] == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert [item["caption"] for item in ds] == ["one a", "two a", "three a"]  # annotation order, stripped
    assert ds.report.num_images == 3 and "captions_train2017.json" in ds.report.summary()


def test_coco_random_caption_is_seeded_and_changes_with_epoch(tmp_path):
    write_coco(tmp_path)
    first, second, other_seed = (data.load_dataset("coco2017", tmp_path, resolution=8, seed=s) for s in (0, 0, 1))
    per_epoch = []
    for epoch in range(12):
        for ds in (first, second, other_seed):
            ds.set_epoch(epoch)
        assert first.caption(0) == second.caption(0)
        assert first.caption(0) in {"one a", "one b", "one c", "one d", "one e"}
        per_epoch.append((first.caption(0), other_seed.caption(0)))
    assert len({a for a, _ in per_epoch}) > 1
    assert [a for a, _ in per_epoch] != [b for _, b in per_epoch]


def test_coco_all_mode_has_one_sample_per_annotation(tmp_path):
    write_coco(tmp_path)
    ds = data.load_dataset("coco2017", tmp_path, resolution=8, caption_mode="all")
    assert len(ds) == 8
    assert sorted(ds.caption(i) for i in range(len(ds)))[:3] == ["one a", "one b", "one c"]
    assert ds.report.num_images == 3


def test_coco_caption_pairs_one_seeded_caption_per_image(tmp_path):
    write_coco(tmp_path, split="val")
    pairs = data.coco_caption_pairs(tmp_path, "val", seed=0)
    assert [p.name for p, _ in pairs] == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert pairs[1][1] == "two a" and pairs[2][1] in ("three a", "three b")
    assert pairs == data.coco_caption_pairs(tmp_path, "val", seed=0)
    assert len({data.coco_caption_pairs(tmp_path, "val", seed=s)[0][1] for s in range(10)}) > 1
    subset = data.coco_caption_pairs(tmp_path, "val", num_samples=2, seed=0)
    assert len(subset) == 2 and all(pair in pairs for pair in subset)  # same caption for an image in any subset


def test_coco_invalid_json_names_the_file(tmp_path):
    path = write_coco(tmp_path)
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="captions_train2017.json: not valid JSON.*Expected the COCO"):
        data.load_dataset("coco2017", tmp_path)
    path.write_text('{"images": []}')
    with pytest.raises(ValueError, match="captions_train2017.json: missing 'images' or 'annotations'"):
        data.load_dataset("coco2017", tmp_path)


def test_coco_empty_caption_is_named_and_skippable(tmp_path):
    write_coco(tmp_path, captions={1: ["one a"], 2: ["  "], 3: ["three a"]})
    with pytest.raises(ValueError, match=r"captions_train2017.json: annotations\[\d\] .*image_id 2.*empty caption"):
        data.load_dataset("coco2017", tmp_path)
    ds = data.load_dataset("coco2017", tmp_path, resolution=8, skip_bad_images=True)
    assert len(ds) == 2 and ds.report.num_without_caption == 2  # the empty caption, then the image left without any


# ---------------------------------------------------------------------------------------------------------------------
# fine-grained class folders
@pytest.mark.parametrize("folder, clean", [
    ("001.Black_footed_Albatross", "black footed albatross"),
    ("12-Sun_Flower", "sun flower"),
    ("Pink  Primrose", "pink primrose"),
    ("english-setter", "english setter"),
])
def test_clean_class_name(folder, clean):
    assert data.clean_class_name(folder) == clean


def test_finegrained_caption_from_cleaned_folder_name(tmp_path):
    write_image(tmp_path / "001.Black_footed_Albatross" / "a.jpg", fmt="JPEG")
    write_image(tmp_path / "002.Laysan_Albatross" / "b.png")
    ds = data.load_dataset("finegrained", tmp_path, resolution=8, category="bird")
    assert [ds.caption(i) for i in range(2)] == [
        "a photo of a black footed albatross, a type of bird", "a photo of a laysan albatross, a type of bird"]
    assert data.load_dataset("auto", tmp_path, template="{class}").caption(1) == "laysan albatross"
    with pytest.raises(ValueError, match="pass category="):
        data.load_dataset("finegrained", tmp_path)


def test_empty_folder_names_folder_and_formats(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path}: no images found.*metadata.jsonl"):
        data.load_dataset("auto", tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: no images in class sub-folders"):
        data.load_dataset("finegrained", tmp_path, category="bird")


# ---------------------------------------------------------------------------------------------------------------------
# image folder + metadata
def test_imagefolder_reads_metadata_jsonl_and_csv(tmp_path):
    write_imagefolder(tmp_path, ["a red circle", "a blue square"], column="prompt")
    ds = data.load_dataset("auto", tmp_path, resolution=8, caption_column="prompt")
    assert [(os.path.basename(x["path"]), x["caption"]) for x in ds] == [("0.png", "a red circle"),
                                                                         ("1.png", "a blue square")]
    assert "metadata.jsonl" in ds.report.source and "'prompt'" in ds.report.summary()
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text('file_name,text\n0.png,"a cat, sitting"\n1.png,a dog\n')
    assert [x["caption"] for x in data.load_dataset("imagefolder", tmp_path, resolution=8)] == ["a cat, sitting",
                                                                                                 "a dog"]


def test_imagefolder_wrong_caption_column_lists_columns(tmp_path):
    write_imagefolder(tmp_path, ["a red circle"], column="caption")
    with pytest.raises(ValueError, match=r"metadata.jsonl: line 1 has no column 'text'; columns present: "
                                         r"\['caption', 'file_name'\]"):
        data.load_dataset("imagefolder", tmp_path)


def test_imagefolder_misnamed_metadata_is_an_error_not_silent(tmp_path):
    write_imagefolder(tmp_path, ["a red circle"])
    (tmp_path / "metadata.jsonl").rename(tmp_path / "metadata.json")
    with pytest.raises(ValueError, match=r"no metadata.jsonl or metadata.csv.*found \['metadata.json'\]"):
        data.load_dataset("auto", tmp_path)


def test_imagefolder_empty_caption_names_file_and_line(tmp_path):
    write_imagefolder(tmp_path, ["a red circle", "", "a dog"])
    with pytest.raises(ValueError, match=r"metadata.jsonl: line 2 \(1.png\) has an empty 'text'"):
        data.load_dataset("imagefolder", tmp_path)


def test_imagefolder_unlisted_image_has_no_caption(tmp_path):
    write_imagefolder(tmp_path, ["a red circle"])
    write_image(tmp_path / "extra.png")
    with pytest.raises(ValueError, match="extra.png: image has no caption"):
        data.load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_bad_image_is_named_and_skip_counts_it(tmp_path, damage):
    write_imagefolder(tmp_path, ["a red circle", "a blue square", "a dog"])
    bad = tmp_path / "1.png"
    if damage == "corrupt":
        bad.write_bytes(b"not an image at all" * 10)
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.unlink()
    with pytest.raises(ValueError, match=f"{bad}: cannot read image.*--skip_bad_images"):
        data.scan_dataset("imagefolder", tmp_path)
    ds = data.load_dataset("imagefolder", tmp_path, resolution=8, skip_bad_images=True)
    assert [x["caption"] for x in ds] == ["a red circle", "a dog"]
    assert ds.report.num_unreadable == 1 and "1 unreadable" in ds.report.summary()


@pytest.mark.parametrize("mode", ["header", "decode"])
def test_truncated_jpeg_caught_at_scan(tmp_path, mode):
    write_image(tmp_path / "cls" / "a.jpg", size=(64, 64), fmt="JPEG")
    path = tmp_path / "cls" / "a.jpg"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match="a.jpg: cannot read image"):
        data.scan_dataset("finegrained", tmp_path, template="{class}", scan_mode=mode)
    with pytest.raises(ValueError, match="a.jpg: cannot read image"):
        data.load_rgb(path)


# ---------------------------------------------------------------------------------------------------------------------
# transforms
def test_transform_gives_square_in_range_with_exact_colours():
    image = Image.fromarray(np.broadcast_to(np.array([255, 0, 51], np.uint8), (30, 50, 3)).copy())
    x = data.ImageTransform(resolution=16)(image)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 8, 8], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))


def test_center_crop_keeps_the_middle():
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, 10:20] = 255  # white middle third of a wide image
    x = data.ImageTransform(resolution=10)(Image.fromarray(array))
    assert torch.all(x[:, :, 1:-1] == 1.0)  # bicubic may blur the outer columns only


def test_flip_equals_torch_flip_of_unflipped(tmp_path):
    write_imagefolder(tmp_path, ["a", "b", "c", "d"])
    flipping = data.load_dataset("imagefolder", tmp_path, resolution=8, random_flip=True, seed=3)
    plain = data.load_dataset("imagefolder", tmp_path, resolution=8, seed=3)
    flips = [flipping.flip(i) for i in range(4)]
    assert any(flips) and not all(flips)
    for i in range(4):
        expected = torch.flip(plain[i]["pixel_values"], dims=[-1]) if flips[i] else plain[i]["pixel_values"]
        assert torch.equal(flipping[i]["pixel_values"], expected)


def test_random_crop_is_reproducible_and_varies_by_epoch(tmp_path):
    write_image(tmp_path / "cls" / "a.png", size=(64, 20))

    def crops_per_epoch():
        ds = data.load_dataset("finegrained", tmp_path, resolution=8, center_crop=False, template="{class}")
        crops = []
        for epoch in range(6):
            ds.set_epoch(epoch)
            crops.append(ds[0]["pixel_values"])
        return crops

    first, resumed = crops_per_epoch(), crops_per_epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, resumed))
    assert len({tuple(c.flatten().tolist()) for c in first}) > 1


# ---------------------------------------------------------------------------------------------------------------------
# demo dataset
def test_demo_dataset_is_deterministic_reused_and_in_tiny_vocabulary(tmp_path):
    a = data.make_demo_dataset(tmp_path / "a", num_images=8, resolution=32, seed=1)
    b = data.make_demo_dataset(tmp_path / "b", num_images=8, resolution=32, seed=1)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 10
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    mtime = (a / "00000.png").stat().st_mtime_ns
    assert data.make_demo_dataset(a, num_images=8, resolution=32, seed=1) == a
    assert (a / "00000.png").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    captions = [json.loads(line)["text"] for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(set(captions)) > 4 and all(w in TINY_WORDS for c in captions for w in c.split())
    with pytest.raises(ValueError, match="not a demo dataset"):
        data.make_demo_dataset(a, num_images=9, resolution=32, seed=1)


def test_load_demo_builds_then_reads_as_imagefolder(tmp_path):
    ds = data.load_dataset("demo", tmp_path / "demo", resolution=16, demo_num_images=6, demo_resolution=32)
    item = ds[0]
    assert len(ds) == 6 and item["pixel_values"].shape == (3, 16, 16) and item["caption"].startswith("a ")
    assert ds.report.kind == "demo" and ds.report.source.endswith("metadata.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# loading batches
def test_dataloader_order_fixed_by_seed_and_epoch(tmp_path):
    write_imagefolder(tmp_path, [f"caption {i}" for i in range(6)])

    def epoch_captions(seed, epoch):
        loader = data.build_dataloader(data.load_dataset("imagefolder", tmp_path, resolution=8), 4, seed=seed)
        loader.sampler.set_epoch(epoch)
        assert loader.dataset.epoch == epoch
        return [c for batch in loader for c in batch["captions"]]

    assert epoch_captions(0, 0) == epoch_captions(0, 0)
    assert epoch_captions(0, 0) != epoch_captions(0, 1)
    assert sorted(epoch_captions(1, 0)) == [f"caption {i}" for i in range(6)]
    batch = next(iter(data.build_dataloader(data.load_dataset("auto", tmp_path, resolution=8), 4, shuffle=False)))
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["captions"][0] == "caption 0"


def test_tokenize_captions_pads_to_model_max_length(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    ids = data.tokenize_captions(tokenizer, ["a red circle", "a photo " * 100])
    assert ids.shape == (2, 77) and ids[0, :5].tolist() == tokenizer("a red circle").input_ids


# ---------------------------------------------------------------------------------------------------------------------
# images read for real (issue 13, items 10-12; issue 12 item 11)
def corrupt_png_body(path):
    """Valid chunks and CRCs, but the zlib data inside IDAT is garbage: verify() passes, decoding fails."""
    import struct
    import zlib

    raw = bytearray(path.read_bytes())
    i = raw.find(b"IDAT")
    n = struct.unpack(">I", raw[i - 4:i])[0]
    body = bytearray(raw[i + 4:i + 4 + n])
    body[n // 2:n // 2 + 16] = b"\x00" * 16
    raw[i + 4:i + 4 + n] = body
    raw[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))


def test_corrupt_png_body_fails_the_decode_scan_and_is_skipped_at_load_in_header_mode(tmp_path):
    write_imagefolder(tmp_path, ["a", "b", "c"])
    corrupt_png_body(tmp_path / "1.png")
    with pytest.raises(ValueError, match="1.png: cannot read image"):
        data.scan_dataset("imagefolder", tmp_path, scan_cache=False)
    header = data.load_dataset("imagefolder", tmp_path, resolution=8, scan_mode="header", scan_cache=False)
    assert len(header) == 3  # headers and CRCs are fine
    with pytest.raises(data.BadImageError, match="1.png: cannot read image") as err:
        header[1]
    assert "--skip_bad_images" in str(err.value)
    lazy = data.load_dataset("imagefolder", tmp_path, resolution=8, scan_mode="header", skip_bad_images=True,
                             scan_cache=False)
    assert [x["caption"] for x in lazy] == ["a", "c", "c"] and list(lazy.skipped) == [str(tmp_path / "1.png")]


def test_truncated_jpeg_with_end_marker_appended_fails_the_decode_scan(tmp_path):
    good = write_image(tmp_path / "cls" / "good.jpg", size=(64, 48), fmt="JPEG")
    grey = write_image(tmp_path / "cls" / "grey.jpg", size=(64, 48), color=(128, 128, 128), fmt="JPEG")
    bad = tmp_path / "cls" / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2] + b"\xff\xd9")
    problems, decoded = data.check_images([good, grey, bad], tmp_path, "decode", scan_cache=False)
    assert decoded == 3 and list(problems) == [bad] and "data ends early" in problems[bad]
    assert data.check_images([bad], tmp_path, "header", scan_cache=False)[0] == {}  # what header mode cannot see


def test_scan_cache_makes_a_second_scan_read_nothing_and_notices_changes(tmp_path):
    write_imagefolder(tmp_path, ["a", "b", "c"])
    first = data.scan_dataset("imagefolder", tmp_path, progress=False)
    assert first.num_decoded == 3 and (tmp_path / ".restune_cache" / "scan.json").is_file()
    assert data.scan_dataset("imagefolder", tmp_path).num_decoded == 0
    corrupt_png_body(tmp_path / "2.png")
    with pytest.raises(ValueError, match="2.png: cannot read image"):
        data.scan_dataset("imagefolder", tmp_path)
    report = data.scan_dataset("imagefolder", tmp_path, skip_bad_images=True)
    assert report.num_decoded == 0 and report.num_unreadable == 1  # the bad verdict is cached too
    assert "0 read now" in report.summary()


def test_a_scan_shared_by_worker_processes_finds_what_one_process_finds(tmp_path):
    names = [write_image(tmp_path / "cls" / f"{i}.{ext}", size=(200 + i, 150), fmt=fmt)
             for i, (ext, fmt) in enumerate([("jpg", "JPEG"), ("png", "PNG")] * 5)]
    corrupt_png_body(names[3])
    cut = names[4].read_bytes()
    names[4].write_bytes(cut[: len(cut) // 2])  # no end marker: header mode sees it too
    names[6].write_bytes(b"not an image")
    missing = tmp_path / "cls" / "gone.png"
    for mode in ("decode", "header"):
        one = data.check_images([*names, missing], tmp_path, mode, scan_cache=False, workers=1)
        two = data.check_images([*names, missing], tmp_path, mode, scan_cache=False, workers=2)
        assert one == two and one[1] == 10
        expected = [names[3], names[4], names[6], missing] if mode == "decode" else [names[4], names[6], missing]
        assert list(one[0]) == expected, (mode, one[0])
    assert "no end-of-image marker" in one[0][names[4]] and "FileNotFoundError" in one[0][missing]


def _bytes_read() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through /proc/self/io (Linux)")
def test_header_scan_reads_a_jpeg_header_and_tail_only(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(800, 600), fmt="JPEG")  # noise: ~ 300 KB
    before = _bytes_read()
    assert data.check_images([path], tmp_path, "header", scan_cache=False, workers=1) == ({}, 1)
    header = _bytes_read() - before
    assert 0 < header < path.stat().st_size / 10, (header, path.stat().st_size)  # before: the whole file
    before = _bytes_read()
    data.check_images([path], tmp_path, "decode", scan_cache=False, workers=1)
    assert _bytes_read() - before >= path.stat().st_size  # decode reads every byte


def test_exif_orientation_is_applied():
    from PIL import Image as PILImage

    image = PILImage.new("RGB", (20, 10), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path_bytes = __import__("io").BytesIO()
    image.save(path_bytes, "JPEG", exif=exif.tobytes())
    assert data.to_rgb(PILImage.open(path_bytes)).size == (10, 20)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image as PILImage

    path = tmp_path / "deep.png"
    PILImage.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(path)
    assert PILImage.open(path).mode.startswith("I")
    assert np.asarray(data.load_rgb(path))[0, 0].tolist() == [128, 128, 128]  # convert("RGB") gives 255


def test_transparency_is_composited_on_white(tmp_path):
    from PIL import Image as PILImage

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent red: dropping alpha would show red
    rgba[0, 2] = (0, 0, 0, 128)  # half black
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(data.load_rgb(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[0, 2, 0]) - 127) <= 1


def test_extreme_aspect_ratio_is_a_named_error(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"])
    write_image(tmp_path / "1.png", size=(2000, 1))
    with pytest.raises(ValueError, match=r"1.png: cannot read image \(image is 2000x1 \(aspect ratio 2000:1\)"):
        data.scan_dataset("imagefolder", tmp_path, scan_mode="header", scan_cache=False)
    with pytest.raises(data.BadImageError, match="1.png: image is 2000x1"):
        data.load_rgb(tmp_path / "1.png")


def test_coco_duplicate_ids_and_names_outside_the_folder_are_named(tmp_path):
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    content["images"].append(dict(content["images"][0]))
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"captions_train2017.json: 1 image id\(s\) appear more than once.*id 3 x2"):
        data.load_dataset("coco2017", tmp_path)
    content["images"].pop()
    content["images"][0]["file_name"] = "../../etc/passwd"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"captions_train2017.json: image id 3 has file_name '../../etc/passwd', "
                                         "outside"):
        data.load_dataset("coco2017", tmp_path)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hosts", "sub/../../x.png"])
def test_imagefolder_file_name_outside_the_folder_is_named(tmp_path, name):
    write_imagefolder(tmp_path / "d", ["a"])
    (tmp_path / "d" / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a"}) + "\n")
    with pytest.raises(ValueError, match=f"metadata.jsonl: line 1 has file_name '{name}', outside"):
        data.load_dataset("imagefolder", tmp_path / "d")


def test_symlink_loop_in_class_folders_is_named(tmp_path):
    write_image(tmp_path / "dogs" / "a.png")
    (tmp_path / "dogs" / "again").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="symlink loop"):
        data.load_dataset("finegrained", tmp_path, template="{class}")


def test_metadata_not_utf8_is_named(tmp_path):
    write_imagefolder(tmp_path, ["a"])
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "0.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="metadata.jsonl: not UTF-8 text.*save it as UTF-8"):
        data.load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize("folder, clean", [("n02085620-Chihuahua", "chihuahua"),
                                           ("n02085782-Japanese_spaniel", "japanese spaniel")])
def test_wordnet_prefixes_are_stripped(folder, clean):
    assert data.clean_class_name(folder) == clean


@pytest.mark.parametrize("text, fixed", [("a photo of a acura rl sedan", "a photo of an acura rl sedan"),
                                         ("a photo of an bird", "a photo of a bird"),
                                         ("A owl, a type of a university", "An owl, a type of a university"),
                                         ("a hour", "an hour")])
def test_articles_follow_the_word(text, fixed):
    assert data.fix_articles(text) == fixed


def test_derived_captions_are_counted_summarised_and_written(tmp_path):
    root = tmp_path / "dogs"
    for i in range(3):
        write_image(root / "n02085620-Chihuahua" / f"{i}.png", seed=i)
    write_image(root / "n02100735-English_setter" / "x.png")
    write_image(root / "Acura_RL_Sedan_2012" / "y.png")
    ds = data.load_dataset("finegrained", root, resolution=8, template="a photo of a {class}")
    assert ds.report.derived_captions == {"a photo of a chihuahua": 3, "a photo of an english setter": 1,
                                          "a photo of an acura rl sedan 2012": 1}
    assert "3 captions derived from class names" in ds.report.summary()
    assert "'a photo of a chihuahua' x3" in ds.report.summary()
    path = data.write_caption_set(ds.report, tmp_path / "out")
    body = json.loads(path.read_text())
    assert list(body["captions"].items())[0] == ("a photo of a chihuahua", 3) and len(body["captions"]) == 3
    write_imagefolder(tmp_path / "given", ["a"])
    assert data.write_caption_set(data.scan_dataset("imagefolder", tmp_path / "given"), tmp_path / "o2") is None


def test_demo_folder_gets_a_normal_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = data.make_demo_dataset(tmp_path / "demo", num_images=2, resolution=16)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755 and (out / "00000.png").stat().st_mode & 0o777 == 0o644
