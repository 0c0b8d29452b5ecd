"""kohya's folders and captions (issue 27): N_name repeat folders, caption files beside the images, tag shuffling with
kept tokens and tag dropout (restune_diffusion/data/kohya.py, captions.py)."""

from pathlib import Path

import numpy as np
import pytest
from test_data import write_image
from test_train import fresh_accelerate_state  # noqa: F401 (autouse)

from restune_diffusion import data
from restune_diffusion import train as T
from restune_diffusion.data import CaptionOptions, process_caption


def write_kohya(root):
    """10_sks dog/: 3 tagged images; 2_cat/: 2 images without caption files (the folder name is the caption);
    one loose image with a .caption file; an image in a sub-folder of a repeat folder (not read, as in kohya)."""
    dog = root / "10_sks dog"
    for i in range(3):
        write_image(dog / f"dog{i}.png", size=(32, 32), seed=i)
        (dog / f"dog{i}.txt").write_text(f"sks dog, sitting, grass {i}, sunny\n")
    for i in range(2):
        write_image(root / "2_cat" / f"cat{i}.jpg", size=(32, 32), seed=10 + i, fmt="JPEG")
    write_image(root / "loose.png", size=(32, 32), seed=20)
    (root / "loose.caption").write_text("a loose image\n")
    write_image(dog / "raw" / "unused.png", size=(32, 32), seed=30)
    return root


def test_a_kohya_folder_is_detected_and_read_with_its_repeats_and_captions(tmp_path):
    root = write_kohya(tmp_path / "set")
    assert data.detect_kind(root) == "kohya"
    ds = data.load_dataset("auto", root, resolution=32, scan_cache=False, progress=False)
    assert ds.report.kind == "kohya"
    assert (len(ds), ds.report.num_images) == (3 * 10 + 2 * 2 + 1, 6)
    by_image = {}
    for s in ds.samples:
        by_image.setdefault(s.path.name, []).append(s.captions)
    assert {k: len(v) for k, v in by_image.items()} == {"loose.png": 1, "dog0.png": 10, "dog1.png": 10,
                                                         "dog2.png": 10, "cat0.jpg": 2, "cat1.jpg": 2}
    assert by_image["dog1.png"][0] == ["sks dog, sitting, grass 1, sunny"]
    assert by_image["cat0.jpg"][0] == ["cat"] and by_image["loose.png"][0] == ["a loose image"]
    assert "10_sks dog: 3 images x10" in ds.report.summary() and "2_cat: 2 images x2" in ds.report.summary()


def test_metadata_wins_over_caption_files_and_an_explicit_extension_is_the_only_one_read(tmp_path):
    root = write_kohya(tmp_path / "set")
    (root / "10_sks dog" / "dog0.caption").write_text("from the caption file")
    ds = data.load_dataset("kohya", root, resolution=32, caption_extension="caption", scan_cache=False,
                           progress=False, skip_bad_images=True)  # dog1/dog2 have no .caption: dropped, counted
    assert {s.path.name for s in ds.samples} == {"dog0.png", "loose.png", "cat0.jpg", "cat1.jpg"}
    assert ds.report.num_without_caption == 2
    (root / "metadata.jsonl").write_text('{"file_name": "loose.png", "text": "x"}\n')
    assert data.detect_kind(root) == "imagefolder"


def test_an_image_without_a_caption_file_beside_captioned_ones_is_named(tmp_path):
    root = write_kohya(tmp_path / "set")
    (root / "10_sks dog" / "dog2.txt").unlink()
    with pytest.raises(ValueError, match=r"dog2\.png: image has no caption file \(dog2\.txt; looked for "
                                         r"\.txt/\.caption\)") as err:
        data.load_dataset("auto", root, resolution=32, scan_cache=False, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change,message", [
    (lambda r: (r / "mydog").mkdir(), r"mydog: a folder without a repeat count .* like 10_mydog"),
    (lambda r: (r / "10_sks dog" / "dog0.txt").write_text("\n \n"), r"dog0\.txt: empty caption file"),
    (lambda r: (r / "10_sks dog" / "dog0.txt").write_bytes(b"\xff\xfe\x00bad"), r"dog0\.txt: not UTF-8"),
])
def test_kohya_layout_problems_are_named(tmp_path, change, message):
    root = write_kohya(tmp_path / "set")
    change(root)
    with pytest.raises(ValueError, match=message):
        data.load_dataset("kohya", root, resolution=32, scan_cache=False, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# tags
TAGS = "sks dog, red collar, sitting, grass, sunny, park, tree, bench"


def test_shuffle_keeps_the_first_keep_tokens_tags_and_moves_the_others():
    options = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    seen = set()
    for seed in range(20):
        out = process_caption(TAGS, options, np.random.default_rng(seed)).split(", ")
        assert out[:2] == ["sks dog", "red collar"] and sorted(out) == sorted(TAGS.split(", "))
        seen.add(tuple(out[2:]))
    assert len(seen) > 10


def test_tag_dropout_never_drops_kept_tags_and_a_separator_keeps_a_front_and_an_end():
    options = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    kept = [process_caption(TAGS, options, np.random.default_rng(s)).split(", ") for s in range(50)]
    assert all(k[0] == "sks dog" for k in kept) and 3 < np.mean([len(k) for k in kept]) < 7
    options = CaptionOptions(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    out = process_caption("sks dog, collar ||| a, b, c, d ||| best quality", options, np.random.default_rng(0))
    parts = out.split(", ")
    assert parts[:2] == ["sks dog", "collar"] and parts[-1] == "best quality" and sorted(parts[2:6]) == list("abcd")
    assert process_caption(TAGS, CaptionOptions(keep_tokens=3), None) == TAGS  # nothing asked: the text as it is


@pytest.mark.parametrize("field,value,message", [
    ("keep_tokens", -1, "--keep_tokens must be an integer >= 0"),
    ("caption_tag_dropout_rate", 1.5, r"--caption_tag_dropout_rate must be a probability in \[0, 1\]"),
    ("keep_tokens_separator", " ", "--keep_tokens_separator must be a non-blank string"),
])
def test_caption_options_name_the_flag(field, value, message):
    with pytest.raises(ValueError, match=message):
        CaptionOptions(**{field: value})


def test_shuffled_captions_are_a_function_of_seed_epoch_and_index(tmp_path):
    root = write_kohya(tmp_path / "set")
    make = lambda: data.load_dataset("kohya", root, resolution=32, scan_cache=False, progress=False,  # noqa: E731
                                     shuffle_caption=True, keep_tokens=1, seed=3)
    a, b = make(), make()
    a.set_epoch(1)
    b.set_epoch(1)
    first = [a.caption(i) for i in range(len(a))]
    assert first == [b.caption(i) for i in range(len(b))]  # another process, or a resumed run
    assert all(c.startswith("sks dog, ") for c in first if "sitting" in c)
    a.set_epoch(2)
    assert [a.caption(i) for i in range(len(a))] != first
    repeats = [c for i, c in enumerate(first) if a.samples[i].path.name == "dog0.png"]
    assert len(set(repeats)) > 1  # the 10 repeats of one image get their own orders


def test_train_t2i_trains_on_a_kohya_folder_with_kohya_caption_flags(tmp_path):
    root = write_kohya(tmp_path / "set")
    argv = ["--config", str(Path(__file__).parents[1] / "configs/tiny/lora.yaml"), "--pretrained_model_name_or_path",
            "tiny-random", "--dataset", "auto", "--train_data_dir", str(root), "--shuffle_caption",
            "--keep_tokens", "1", "--caption_tag_dropout_rate", "0.1", "--max_train_steps", "2",
            "--train_batch_size", "2", "--output_dir", str(tmp_path / "out"), "--num_validation_images", "0"]
    args = T.parse_args(argv)
    assert (args.dataset, args.shuffle_caption, args.keep_tokens) == ("auto", True, 1)
    summary = T.train(args)
    assert summary["global_step"] == 2
