"""The tiny world (restune_diffusion/world.py): renderer, concept datasets, classifier, metrics, the shipped base."""

import json

import numpy as np
import pytest
import torch

from restune_diffusion import world
from restune_diffusion.data import load_dataset


def test_renderer_is_deterministic_and_splits_hold_their_shapes():
    a, b = world.examples("pretrain", 20), world.examples("pretrain", 30)
    assert a == b[:20]
    assert torch.equal(world.render_batch(a), world.render_batch(b[:20]))
    assert {x.shape for x in world.examples("pretrain", 200)} == set(world.PRETRAIN_SHAPES)
    assert {x.shape for x in world.examples("concept_train", 20)} == {world.CONCEPT}
    assert world.examples("concept_train", 20) != world.examples("concept_heldout", 20)
    assert a[0].caption == f"a {a[0].colour} {a[0].shape} on a {a[0].background} background"


def test_concept_writers_give_the_three_layouts_users_have(tmp_path):
    paths = world.write_concept_datasets(tmp_path, n_train=6, n_heldout=4)
    layouts = (("train_imagefolder", "imagefolder", 6, {}), ("heldout_imagefolder", "imagefolder", 4, {}),
               ("train_classes", "finegrained", 6, {"template": "a {class}"}), ("train_coco", "coco2017", 6, {}))
    for name, kind, n, kw in layouts:
        ds = load_dataset(kind, paths[name], resolution=32, progress=False, **kw)
        assert len(ds) == n, name
        assert all("star" in ds.caption(i) for i in range(n)), name


def test_shipped_classifier_is_accurate_on_fresh_images():
    classifier = world.load_classifier()
    fresh = world.examples("classifier", 10_300)[10_000:]  # training drew indices 0..8191
    acc = world.prompt_accuracy(classifier, world.render_batch(fresh), fresh)
    assert acc["all"] >= 0.97, acc


def test_domain_fid_is_zero_on_the_same_images_and_rises_with_a_shift():
    classifier = world.load_classifier()
    real = world.render_batch(world.examples("pretrain", 256))
    other = world.render_batch(world.examples("pretrain", 512)[256:])
    stars = world.render_batch(world.examples("concept_heldout", 256))
    same, fresh, shifted = (world.domain_fid(classifier, real, x) for x in (real, other, stars))
    assert abs(same) < 1e-3 * shifted
    assert fresh < 0.2 * shifted
    blurred = torch.nn.functional.avg_pool2d(other.float(), 3, 1, 1).round().to(torch.uint8)  # a milder shift
    assert fresh < world.domain_fid(classifier, real, blurred) < shifted


def test_prompt_accuracy_counts_each_attribute_and_all_at_once():
    classifier = world.load_classifier()
    asked = world.examples("pretrain", 8)
    images = world.render_batch(asked)
    wrong = [world.Attributes(a.shape, a.colour, "white" if a.background != "white" else "black") for a in asked]
    assert world.prompt_accuracy(classifier, images, asked)["all"] == 1.0
    acc = world.prompt_accuracy(classifier, images, wrong)
    assert acc["background"] == 0.0 and acc["all"] == 0.0 and acc["shape"] == 1.0
    with pytest.raises(ValueError, match="one image per prompt"):
        world.prompt_accuracy(classifier, images[:3], asked)


def test_world_report_writes_the_concept_as_the_runs_imagefolder(tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(dataset="imagefolder", data_dir=None, output_dir=str(tmp_path / "run"))
    world.use_concept_data(args)
    lines = (tmp_path / "run" / "concept_data" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == world.CONCEPT_TRAIN_N and "star" in json.loads(lines[0])["text"]
    with pytest.raises(ValueError, match="expected dataset: imagefolder"):
        world.use_concept_data(SimpleNamespace(dataset="demo", data_dir=None, output_dir=str(tmp_path)))


@pytest.mark.slow
def test_shipped_base_follows_pretraining_prompts_and_fails_the_concept():
    from restune_diffusion.models import load_model

    metrics, _ = world.score(load_model("tiny"), world.load_classifier(), repeats=2)
    assert metrics["pretrain_accuracy"]["all"] >= 0.8, metrics
    assert metrics["concept_accuracy"]["shape"] <= 0.25, metrics  # chance over four shape kinds
    assert np.isfinite(metrics["concept_domain_fid"])


@pytest.mark.slow
def test_short_res_tuning_fine_tune_beats_the_base_on_the_concept(tmp_path):
    from restune_diffusion import train as T

    out = tmp_path / "run"
    args = T.parse_args(["--output_dir", str(out), "--validation_steps", "0", "--num_validation_images", "0"])
    summary = T.train(args)  # the default job: Res-Tuning on the concept, then the before/after report
    before, after = summary["world"]["before"], summary["world"]["after"]
    assert after["concept_accuracy"]["all"] >= before["concept_accuracy"]["all"] + 0.1, (before, after)
    assert after["concept_domain_fid"] < 0.5 * before["concept_domain_fid"], (before, after)
    assert (out / "before_after.png").is_file() and json.loads((out / "world_report.json").read_text())["after"]


@pytest.mark.slow
def test_quality_bench_quick_mode_writes_every_row(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "quality_tiny.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "quality-tiny.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["base", "res_tuning"]
    assert rows[0]["params"] == 0 and rows[1]["params"] > 0
    assert all(0 <= r["concept_accuracy"][0] <= 1 and np.isfinite(r["domain_fid"][0]) for r in rows)
    assert "| res_tuning |" in (tmp_path / "quality-tiny.md").read_text()
