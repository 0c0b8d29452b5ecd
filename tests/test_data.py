import json
import os

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
# latent caching
def test_cache_latents_stores_both_flips_and_samples_per_epoch(tmp_path, tiny_vae):
    write_imagefolder(tmp_path, ["a", "b", "c"])
    ds = data.load_dataset("imagefolder", tmp_path, resolution=16, random_flip=True, seed=5)
    cached = data.cache_latents(ds, tiny_vae, batch_size=2)
    assert cached.parameters.shape == (3, 2, 8, 8, 8)  # (images, flips, mean+logvar, h, w)
    x = data.ImageTransform(16)(data.load_rgb(tmp_path / "1.png"))[None]
    with torch.no_grad():
        both = tiny_vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    torch.testing.assert_close(cached.parameters[1], both.parameters, atol=1e-5, rtol=1e-4)

    item = cached[1]
    assert item["latents"].shape == (4, 8, 8) and item["caption"] == "b"
    assert torch.equal(item["latents"], cached[1]["latents"])
    mean = both.mean[int(ds.flip(1))] * tiny_vae.config.scaling_factor
    assert (item["latents"] - mean).abs().max() < 6 * both.std.max() * tiny_vae.config.scaling_factor
    picked = set()
    for epoch in range(8):
        cached.set_epoch(epoch)
        picked.add(ds.flip(1))
    assert picked == {True, False}
    assert not torch.equal(item["latents"], cached[1]["latents"])  # fresh noise in a new epoch


def test_cache_latents_encodes_each_image_once_in_all_mode(tmp_path, tiny_vae):
    write_coco(tmp_path)
    ds = data.load_dataset("coco2017", tmp_path, resolution=16, caption_mode="all")
    cached = data.cache_latents(ds, tiny_vae, batch_size=4)
    assert cached.parameters.shape == (3, 1, 8, 8, 8) and len(cached) == 8
    assert data.collate_fn([cached[0], cached[1]])["latents"].shape == (2, 4, 8, 8)


def test_cache_latents_refuses_random_crop(tmp_path, tiny_vae):
    write_imagefolder(tmp_path, ["a"])
    ds = data.load_dataset("imagefolder", tmp_path, resolution=16, center_crop=False)
    with pytest.raises(ValueError, match="random crop cannot be cached"):
        data.cache_latents(ds, tiny_vae)


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
