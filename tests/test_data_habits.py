"""The data habits users bring (issue 17): fine-grained sets in their published layouts, Hugging Face `datasets`,
--max_train_samples, --image_interpolation_mode, --caption_dropout_rate, diffusers' column names."""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from scipy.io import savemat
from test_data import write_image, write_imagefolder
from test_train import fresh_accelerate_state  # noqa: F401 (autouse)

from restune_diffusion import data
from restune_diffusion import train as T
from restune_diffusion.data import finegrained
from restune_diffusion.train import options as OPT


def cell(strings, shape=None):
    """A MATLAB cell array of strings, as savemat writes one from an object array."""
    array = np.empty(len(strings), dtype=object)
    array[:] = list(strings)
    return array.reshape(shape or (len(strings), 1))


def captions(ds):
    return [ds.caption(i) for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------------------------------
# tiny copies of the published layouts
def write_cub(root):
    """4 images of 2 classes; ids 1 and 3 train, 2 and 4 test."""
    base = root / "CUB_200_2011"
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross"}
    images = {1: (1, "a1.jpg"), 2: (1, "a2.jpg"), 3: (2, "l1.jpg"), 4: (2, "l2.jpg")}
    for image_id, (label, name) in images.items():
        write_image(base / "images" / classes[label] / name, size=(8, 8), seed=image_id, fmt="JPEG")
    (base / "classes.txt").write_text("".join(f"{k} {v}\n" for k, v in classes.items()))
    (base / "images.txt").write_text("".join(f"{i} {classes[c]}/{n}\n" for i, (c, n) in images.items()))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, (c, _) in images.items()))
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    return base


def write_dogs(root, lists=True):
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    files = [f"{folders[0]}/n02085620_1.jpg", f"{folders[0]}/n02085620_2.jpg", f"{folders[1]}/n02085782_1.jpg"]
    for k, name in enumerate(files):
        write_image(root / "Images" / name, size=(8, 8), seed=k, fmt="JPEG")
    if lists:
        savemat(root / "train_list.mat", {"file_list": cell(files[:1] + files[2:]), "labels": np.array([[1], [2]])})
        savemat(root / "test_list.mat", {"file_list": cell(files[1:2]), "labels": np.array([[1]])})
    return root


def write_cars(root):
    """devkit layout: 3 train images, 2 test images, 2 classes."""
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(names, (1, 2))})

    def annos(rows):
        array = np.empty((1, len(rows)), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
        for k, (fname, label) in enumerate(rows):
            array[0, k] = (np.array([[0]]), np.array([[label]]), np.array([fname]))
        return array

    train, test = [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 2)], [("00001.jpg", 2), ("00002.jpg", 1)]
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": annos(train)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": annos(test)})
    for k, (name, _) in enumerate(train):
        write_image(root / "cars_train" / name, size=(8, 8), seed=k, fmt="JPEG")
    for k, (name, _) in enumerate(test):
        write_image(root / "cars_test" / name, size=(8, 8), seed=10 + k, fmt="JPEG")
    return root


def write_flowers(root):
    """5 images; labels 1, 1, 2, 77, 2; trnid 1 3, valid 2, tstid 4 5."""
    for k in range(1, 6):
        write_image(root / "jpg" / f"image_{k:05d}.jpg", size=(8, 8), seed=k, fmt="JPEG")
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 77, 2]], dtype=np.uint8)})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 3]]), "valid": np.array([[2]]), "tstid": np.array([[4, 5]])})
    return root


def write_aircraft(root):
    data_dir = root / "fgvc-aircraft-2013b" / "data"
    rows = {"train": [("1025794", "707-320"), ("1340192", "F-16A/B")], "val": [("0056978", "A320")],
            "test": [("1102307", "707-320")]}
    (data_dir / "variants.txt").parent.mkdir(parents=True)
    (data_dir / "variants.txt").write_text("707-320\nA320\nF-16A/B\n")
    for split, items in rows.items():
        (data_dir / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in items))
        for k, (image_id, _) in enumerate(items):
            write_image(data_dir / "images" / f"{image_id}.jpg", size=(8, 8), seed=k, fmt="JPEG")
    return root


def write_food(root, labels=True):
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("apple_pie\neggs_benedict\n")
    if labels:
        (base / "meta" / "labels.txt").write_text("Apple pie\nEggs benedict\n")
    (base / "meta" / "train.txt").write_text("apple_pie/101\neggs_benedict/201\neggs_benedict/202\n")
    (base / "meta" / "test.txt").write_text("apple_pie/102\n")
    for k, name in enumerate(["apple_pie/101", "apple_pie/102", "eggs_benedict/201", "eggs_benedict/202"]):
        write_image(base / "images" / f"{name}.jpg", size=(8, 8), seed=k, fmt="JPEG")
    return base


LAYOUTS = {  # name: (writer, train captions, test captions)
    "cub200": (write_cub, ["a photo of a black footed albatross, a type of bird",
                           "a photo of a laysan albatross, a type of bird"],
               ["a photo of a black footed albatross, a type of bird",
                "a photo of a laysan albatross, a type of bird"]),
    "stanford_dogs": (write_dogs, ["a photo of a chihuahua, a type of dog",
                                   "a photo of a japanese spaniel, a type of dog"],
                      ["a photo of a chihuahua, a type of dog"]),
    "stanford_cars": (write_cars, ["a photo of an AM General Hummer SUV 2000, a type of car",
                                   "a photo of an Acura RL Sedan 2012, a type of car",
                                   "a photo of an Acura RL Sedan 2012, a type of car"],
                      ["a photo of an Acura RL Sedan 2012, a type of car",
                       "a photo of an AM General Hummer SUV 2000, a type of car"]),
    "flowers102": (write_flowers, ["a photo of a pink primrose, a type of flower",
                                   "a photo of a hard-leaved pocket orchid, a type of flower"],
                   ["a photo of a passion flower, a type of flower",
                    "a photo of a hard-leaved pocket orchid, a type of flower"]),
    "fgvc_aircraft": (write_aircraft, ["a photo of a 707-320, a type of aircraft",
                                       "a photo of an F-16A/B, a type of aircraft"],
                      ["a photo of a 707-320, a type of aircraft"]),
    "food101": (write_food, ["a photo of apple pie, a type of food", "a photo of eggs benedict, a type of food",
                             "a photo of eggs benedict, a type of food"], ["a photo of apple pie, a type of food"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_published_layout_gives_its_split_and_human_captions(tmp_path, name):
    write, train, test = LAYOUTS[name]
    write(tmp_path / name)
    for kind in (name, "finegrained", "auto"):  # named, detected among fine-grained sets, detected from scratch
        ds = data.load_dataset(kind, tmp_path / name, resolution=8, scan_cache=False)
        assert captions(ds) == train and ds.report.kind == name, kind
    test_ds = data.load_dataset(name, tmp_path / name, resolution=8, split="test", scan_cache=False)
    assert captions(test_ds) == test and "split test" in test_ds.report.columns
    assert not {s.path for s in ds.samples} & {s.path for s in test_ds.samples}
    assert ds.report.derived_captions == {c: train.count(c) for c in train}


def test_flowers_and_aircraft_have_a_val_split_and_cub_does_not(tmp_path):
    write_flowers(tmp_path / "f")
    assert captions(data.load_dataset("flowers102", tmp_path / "f", resolution=8, split="val")) == [
        "a photo of a pink primrose, a type of flower"]
    write_aircraft(tmp_path / "a")
    assert captions(data.load_dataset("fgvc_aircraft", tmp_path / "a", resolution=8, split="val")) == [
        "a photo of an A320, a type of aircraft"]
    write_cub(tmp_path / "c")
    with pytest.raises(ValueError, match="--split val: CUB-200-2011 has the splits train, test"):
        data.load_dataset("cub200", tmp_path / "c", split="val")


def test_caption_template_and_class_names_file_replace_the_sets_own(tmp_path):
    write_flowers(tmp_path / "f")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"flower number {i}\n" for i in range(1, 103)))
    ds = data.load_dataset("flowers102", tmp_path / "f", resolution=8, template="{} in a garden", class_names=names)
    assert captions(ds) == ["flower number 1 in a garden", "flower number 2 in a garden"]
    assert str(names) in ds.report.source
    names.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=r"names.txt: 2 class names; flowers102 has 102 classes"):
        data.load_dataset("flowers102", tmp_path / "f", class_names=names)
    with pytest.raises(ValueError, match="has no placeholder"):
        data.load_dataset("flowers102", tmp_path / "f", template="a flower")


def test_the_flowers_names_are_the_102_published_in_label_order():
    assert len(finegrained.FLOWERS102_NAMES) == 102 == len(set(finegrained.FLOWERS102_NAMES))
    assert finegrained.FLOWERS102_NAMES[:2] == ("pink primrose", "hard-leaved pocket orchid")
    assert finegrained.FLOWERS102_NAMES[-1] == "blackberry lily"


def test_stanford_dogs_without_its_lists_is_every_image_as_train(tmp_path):
    write_dogs(tmp_path, lists=False)
    ds = data.load_dataset("stanford_dogs", tmp_path, resolution=8)
    assert len(ds) == 3 and "no train_list.mat" in ds.report.source
    with pytest.raises(FileNotFoundError, match=r"test_list.mat: file not found; the test split of Stanford Dogs"):
        data.load_dataset("stanford_dogs", tmp_path, split="test")


def test_stanford_cars_repacked_as_split_folders(tmp_path):
    for split, names in (("train", ["Acura RL Sedan 2012", "BMW M3 Coupe 2012"]), ("test", ["BMW M3 Coupe 2012"])):
        for k, name in enumerate(names):
            write_image(tmp_path / "car_data" / split / name / f"{k}.jpg", size=(8, 8), fmt="JPEG")
    ds = data.load_dataset("stanford_cars", tmp_path / "car_data", resolution=8)
    assert captions(ds) == ["a photo of an acura rl sedan 2012, a type of car",
                            "a photo of a bmw m3 coupe 2012, a type of car"]
    assert captions(data.load_dataset("stanford_cars", tmp_path / "car_data", split="test")) == [
        "a photo of a bmw m3 coupe 2012, a type of car"]
    # unnamed, the same folders are class folders with train/test splits
    assert len(data.load_dataset("finegrained", tmp_path / "car_data", template="{}", split="test")) == 1


def test_food_without_labels_txt_cleans_the_folder_names(tmp_path):
    write_food(tmp_path, labels=False)
    ds = data.load_dataset("food101", tmp_path, resolution=8)
    assert ds.caption(1) == "a photo of eggs benedict, a type of food"


@pytest.mark.parametrize("breakage, message", [
    (lambda b: (b / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n"),
     r"train_test_split.txt: no line for image id 4 \(listed in images.txt\)"),
    (lambda b: (b / "image_class_labels.txt").unlink(),
     r"image_class_labels.txt: file not found. Expected lines `<image id> <class id>`"),
    (lambda b: (b / "classes.txt").unlink(), r"no cub200 layout here or one level below. Expected images.txt"),
    (lambda b: (b / "images.txt").write_text("1 ../../etc/passwd\n"),
     r"images.txt: image id 1 names '../../etc/passwd', outside"),
    (lambda b: (b / "image_class_labels.txt").write_text("1 9\n2 1\n3 2\n4 2\n"), r"image id 1 has class 9, which "
     "classes.txt does not list"),
])
def test_a_broken_cub_index_is_named(tmp_path, breakage, message):
    breakage(write_cub(tmp_path))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.load_dataset("cub200", tmp_path)


def test_broken_mat_files_are_named(tmp_path):
    write_flowers(tmp_path)
    savemat(tmp_path / "setid.mat", {"trnid": np.array([[1, 9]])})
    with pytest.raises(ValueError, match=r"setid.mat: trnid\[1\] is image 9; imagelabels.mat has 5"):
        data.load_dataset("flowers102", tmp_path)
    (tmp_path / "imagelabels.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="imagelabels.mat: not a readable MATLAB file"):
        data.load_dataset("flowers102", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no food101 layout here or one level below. Expected images/<class>/"):
        data.load_dataset("food101", tmp_path)


def test_a_listed_image_that_is_missing_is_named(tmp_path):
    base = write_food(tmp_path)
    (base / "images" / "eggs_benedict" / "202.jpg").unlink()
    with pytest.raises(ValueError, match=r"202.jpg: cannot read image \(FileNotFoundError"):
        data.load_dataset("food101", tmp_path)
    assert len(data.load_dataset("food101", tmp_path, skip_bad_images=True)) == 2


def test_class_folders_with_split_folders_and_without(tmp_path):
    write_image(tmp_path / "plain" / "Red_Star" / "a.png")
    with pytest.raises(ValueError, match="--split test: .* has class folders but no test/ folder"):
        data.load_dataset("finegrained", tmp_path / "plain", template="{}", split="test")
    assert captions(data.load_dataset("finegrained", tmp_path / "plain", template="a {class}")) == ["a red star"]


@pytest.mark.parametrize("text, fixed", [("a F-16A/B", "an F-16A/B"), ("a A320", "an A320"), ("an DC-9", "a DC-9"),
                                         ("a MD-80", "an MD-80"), ("an BMW M3", "a BMW M3"), ("a HUMMER", "a HUMMER"),
                                         ("a AM General", "an AM General"), ("a 707-320", "a 707-320")])
def test_articles_before_initialisms_follow_the_letter(text, fixed):
    assert data.fix_articles(text) == fixed


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
def rgb(seed, size=(8, 8)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """The datasets cache in tmp_path (skips when the optional datasets package is missing)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def tiny_hf(n=4):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [rgb(i) for i in range(n)], "text": [f"caption {i}" for i in range(n)]},
                                      features=features)


def test_a_save_to_disk_folder_loads_with_its_splits(tmp_path, hf_cache):
    import datasets

    datasets.DatasetDict({"train": tiny_hf(4), "test": tiny_hf(1)}).save_to_disk(str(tmp_path / "saved"))
    ds = data.load_dataset("hf", tmp_path / "saved", resolution=8, image_column="image")
    assert captions(ds) == [f"caption {i}" for i in range(4)] and ds.report.kind == "hf"
    pixels = np.asarray(data.load_rgb(ds.samples[2].path))
    assert np.array_equal(pixels, np.asarray(rgb(2)))  # the image itself, losslessly
    assert str(tmp_path / "saved") in ds.report.source and ds.report.data_dir.startswith(str(hf_cache))
    assert len(data.load_dataset("hf", tmp_path / "saved", image_column="image", split="test")) == 1
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        data.load_dataset("hf", tmp_path / "saved", image_column="image", split="validation")
    with pytest.raises(ValueError, match=r"no column 'picture' \(--image_column\); columns: \['image', 'text'\]"):
        data.load_dataset("hf", tmp_path / "saved", image_column="picture")


def test_a_parquet_folder_and_bytes_path_dicts_load(tmp_path, hf_cache):
    import datasets

    (tmp_path / "pq" / "data").mkdir(parents=True)
    tiny_hf(3).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    ds = data.load_dataset("hf", tmp_path / "pq", resolution=8, image_column="image")
    assert captions(ds) == ["caption 0", "caption 1", "caption 2"]
    # rows whose image is a {bytes: None, path} dict (images kept beside the data set) or raw bytes
    write_image(tmp_path / "files" / "a.png", size=(8, 8), seed=7)
    png = (tmp_path / "files" / "a.png").read_bytes()
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    rows = datasets.Dataset.from_dict({"img": [{"bytes": None, "path": str(tmp_path / "files" / "a.png")},
                                               {"bytes": png, "path": None}], "caption": [["x", "y"], ["z"]]},
                                      features=features)
    rows.save_to_disk(str(tmp_path / "dicts"))
    ds = data.load_dataset("hf", tmp_path / "dicts", resolution=8, image_column="img", caption_column="caption")
    assert [s.captions for s in ds.samples] == [["x", "y"], ["z"]]
    assert all((p.read_bytes() == png) for p in (ds.samples[0].path, ds.samples[1].path))


def test_a_hub_id_is_read_from_the_local_cache_and_never_downloaded(tmp_path, hf_cache):
    import datasets

    (tmp_path / "tiny" / "data").mkdir(parents=True)
    tiny_hf(2).to_parquet(str(tmp_path / "tiny" / "data" / "train-00000-of-00001.parquet"))
    data.hf.import_datasets()
    datasets.load_dataset(str(tmp_path / "tiny"))  # what an earlier online load_dataset("someone/tiny") leaves
    (hf_cache / "tiny").rename(hf_cache / "someone___tiny")
    ds = data.load_dataset("hf", "someone/tiny", resolution=8, image_column="image")
    assert captions(ds) == ["caption 0", "caption 1"]
    with pytest.raises(FileNotFoundError, match=r"--dataset_name someone/other: cannot load it from the local datasets "
                       r"cache .*nothing is downloaded"):
        data.load_dataset("hf", "someone/other", image_column="image")


def test_the_export_is_made_once_and_reused(tmp_path, hf_cache, monkeypatch):

    tiny_hf(2).save_to_disk(str(tmp_path / "saved"))
    first = data.load_dataset("hf", tmp_path / "saved", image_column="image")
    monkeypatch.setattr(data.hf, "_image_bytes", lambda *a: pytest.fail("exported again"))
    second = data.load_dataset("hf", tmp_path / "saved", image_column="image")
    assert second.report.data_dir == first.report.data_dir and second.report.num_decoded == 0


def test_without_datasets_installed_the_error_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"--dataset_name needs the datasets package: pip install datasets"):
        data.load_dataset("hf", "someone/tiny")


# ---------------------------------------------------------------------------------------------------------------------
# diffusers' data flags
def test_max_train_samples_is_a_seeded_subset_read_alone(tmp_path):
    write_imagefolder(tmp_path, [f"caption {i}" for i in range(10)])
    full = captions(data.load_dataset("imagefolder", tmp_path, resolution=8))
    a = data.load_dataset("imagefolder", tmp_path, resolution=8, max_train_samples=4, seed=1)
    assert captions(a) == captions(data.load_dataset("imagefolder", tmp_path, max_train_samples=4, seed=1))
    assert len(a) == 4 and set(captions(a)) < set(full) and captions(a) == sorted(captions(a), key=full.index)
    assert captions(a) != captions(data.load_dataset("imagefolder", tmp_path, max_train_samples=4, seed=2))
    assert "--max_train_samples 4 of 10" in a.report.summary()
    assert len(data.load_dataset("imagefolder", tmp_path, max_train_samples=99)) == 10
    keep = {s.path.name for s in a.samples}
    broken = next(p for p in sorted(tmp_path.glob("*.png")) if p.name not in keep)
    broken.write_bytes(b"not an image")  # outside the subset: never read
    assert captions(data.load_dataset("imagefolder", tmp_path, max_train_samples=4, seed=1,
                                      scan_cache=False)) == captions(a)
    with pytest.raises(ValueError, match="max_train_samples must be a positive integer, got 0"):
        data.load_dataset("imagefolder", tmp_path, max_train_samples=0)


def test_interpolation_modes_are_pils_filters(tmp_path):
    image = rgb(3, (24, 16))
    out = {mode: data.ImageTransform(8, interpolation=mode)(image) for mode in data.INTERPOLATION_MODES}
    assert set(data.INTERPOLATION_MODES) == {"bicubic", "bilinear", "box", "hamming", "lanczos", "nearest",
                                             "nearest_exact"}
    assert torch.equal(out["nearest"], out["nearest_exact"]) and not torch.equal(out["lanczos"], out["bicubic"])
    expected = image.resize((12, 8), Image.Resampling.LANCZOS).crop((2, 0, 10, 8))
    assert torch.equal(out["lanczos"], torch.from_numpy(np.asarray(expected, np.float32)).permute(2, 0, 1) / 127.5 - 1)
    with pytest.raises(ValueError, match=r"image_interpolation_mode: expected one of .*got 'cubic'"):
        data.ImageTransform(8, interpolation="cubic")


def test_caption_dropout_is_seeded_per_sample_and_epoch(tmp_path):
    write_imagefolder(tmp_path, [f"caption {i}" for i in range(40)])
    ds = data.load_dataset("imagefolder", tmp_path, resolution=8, caption_dropout_rate=0.3, seed=4)
    first = captions(ds)
    assert 4 <= first.count("") <= 20 and captions(ds) == first
    assert all(c in ("", f"caption {i}") for i, c in enumerate(first))
    ds.set_epoch(1)
    assert captions(ds) != first
    assert set(captions(data.load_dataset("imagefolder", tmp_path, caption_dropout_rate=1.0))) == {""}
    with pytest.raises(ValueError, match=r"caption_dropout_rate must be in \[0, 1\], got 1.5"):
        data.load_dataset("imagefolder", tmp_path, caption_dropout_rate=1.5)


def test_diffusers_image_column_image_reads_file_name_in_an_image_folder(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"])
    ds = data.load_dataset("imagefolder", tmp_path, resolution=8, image_column="image")
    assert captions(ds) == ["a", "b"] and "image='file_name'" in ds.report.columns
    meta = json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[0])
    assert set(meta) == {"file_name", "text"}


# ---------------------------------------------------------------------------------------------------------------------
# through train_t2i.py
def tiny_run_args(tmp_path, *data_flags, steps="1"):
    config = tmp_path / "config.yaml"
    config.write_text("tuners:\n  - {type: res_adapter, dim: 4, targets: [ff]}\n")
    return ["--config", str(config), "--pretrained_model_name_or_path", "tiny-random", "--resolution", "32",
            "--center_crop", "--train_batch_size", "2", "--max_train_steps", steps, "--checkpointing_steps", "0",
            "--num_validation_images", "0", "--output_dir", str(tmp_path / "out"), *data_flags]


def test_diffusers_data_flags_parse_and_enter_the_resolved_config(tmp_path):
    args = T.parse_args(tiny_run_args(tmp_path, "--train_data_dir", str(tmp_path / "d"), "--max_train_samples", "3",
                                      "--image_interpolation_mode", "lanczos", "--caption_dropout_rate", "0.1"))
    assert (args.data_dir, args.dataset) == (str(tmp_path / "d"), "auto")  # --train_data_dir alone: detected
    body = OPT.resolved_config(args)["data"]
    assert (body["max_train_samples"], body["image_interpolation_mode"], body["caption_dropout_rate"]) == (3, "lanczos",
                                                                                                           0.1)
    assert {"split", "scan_mode", "dataset_name", "caption_template", "class_names", "latent_cache_dir"} <= set(body)
    hf_args = T.parse_args(tiny_run_args(tmp_path, "--dataset_name", "someone/tiny", "--dataset", "imagefolder"))
    assert (hf_args.dataset, hf_args.data_dir) == ("hf", None)
    for flags, message in ((["--dataset", "hf"], "--dataset hf needs --dataset_name"),
                           (["--data_dir", "x", "--caption_dropout_rate", "2"], "--caption_dropout_rate must be"),
                           (["--data_dir", "x", "--max_train_samples", "0"], "--max_train_samples must be a positive"),
                           (["--data_dir", "x", "--image_interpolation_mode", "cubic"], "invalid choice")):
        with pytest.raises((ValueError, SystemExit)) as err:
            T.parse_args(tiny_run_args(tmp_path, *flags))
        assert err.type is SystemExit or message in str(err.value)


def test_a_diffusers_style_run_on_a_saved_dataset(tmp_path, hf_cache, capsys):
    import datasets

    datasets.DatasetDict({"train": tiny_hf(6)}).save_to_disk(str(tmp_path / "saved"))
    summary = T.train(T.parse_args(tiny_run_args(tmp_path, "--dataset_name", str(tmp_path / "saved"),
                                                 "--image_column", "image", "--caption_column", "text",
                                                 "--max_train_samples", "4", "--random_flip")))
    out = capsys.readouterr().out
    assert summary["global_step"] == 1 and "4 samples, 4 images (--max_train_samples 4 of 6, seeded)" in out


def test_a_fine_grained_run_writes_its_caption_set_and_the_second_scan_reads_nothing(tmp_path, capsys):
    write_food(tmp_path / "food")
    argv = tiny_run_args(tmp_path, "--dataset", "finegrained", "--data_dir", str(tmp_path / "food"))
    T.train(T.parse_args(argv))
    assert "(3 read now, the rest from the scan cache)" in capsys.readouterr().out
    body = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert body["captions"] == {"a photo of eggs benedict, a type of food": 2,
                                "a photo of apple pie, a type of food": 1}
    assert (tmp_path / "food" / ".restune_cache" / "scan.json").is_file()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    T.train(T.parse_args(argv + ["--output_dir", str(tmp_path / "again")]))
    assert "(0 read now, the rest from the scan cache)" in capsys.readouterr().out
