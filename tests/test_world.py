"""The tiny world (restune_diffusion/world/): scenes and splits, concept data sets, the judges' data, the shipped
judges on their hard-negative set, the protocol's statistics, the shipped base."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from restune_diffusion import world
from restune_diffusion.data import load_dataset
from restune_diffusion.world import judge as judges
from restune_diffusion.world import scene


def test_renderer_is_deterministic_and_splits_hold_their_shapes():
    a, b = world.examples("pretrain", 20), world.examples("pretrain", 30)
    assert a == b[:20]
    assert torch.equal(world.render_batch(a), world.render_batch(b[:20]))
    pretrain = world.examples("pretrain", 2000)
    assert {x.shape for x in pretrain} == set(world.PRETRAIN_SHAPES)
    assert not {(x.shape, x.colour, x.background) for x in pretrain} & set(world.HELDOUT_COMBOS)
    assert {x.template for x in pretrain} == set(range(len(scene.TEMPLATES)))  # every phrasing
    for concept in world.CONCEPTS:
        train = world.concept_examples("concept_train", concept, 20)
        assert {x.shape for x in train} == {concept}
        assert train != world.concept_examples("concept_heldout", concept, 20)
        assert all(x.caption == f"a {x.colour} {concept} on a {x.background} background" for x in train)


def test_shapes_stay_inside_the_image_at_every_size_and_rotation():
    for attrs in world.examples("reference", 300):
        image = np.asarray(world.render(attrs)).astype(int)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.array(world.BACKGROUNDS[attrs.background])
        assert np.abs(border - background).max() <= 40, attrs  # at most an anti-aliased corner touches the edge


def test_every_caption_word_is_one_token_of_the_shipped_tokenizer():
    from restune_diffusion.models import load_model

    tokenizer = load_model("tiny").tokenizer
    for word in scene.WORDS:
        assert len(tokenizer.tokenize(word)) == 1, word


def test_concept_writers_give_the_three_layouts_users_have(tmp_path):
    paths = world.write_concept_datasets(tmp_path, "heart", n_train=6, n_heldout=4)
    layouts = (("train_imagefolder", "imagefolder", 6, {}), ("heldout_imagefolder", "imagefolder", 4, {}),
               ("train_classes", "finegrained", 6, {"template": "a {class}"}), ("train_coco", "coco2017", 6, {}))
    for name, kind, n, kw in layouts:
        ds = load_dataset(kind, paths[name], resolution=32, progress=False, **kw)
        assert len(ds) == n, name
        assert all("heart" in ds.caption(i) for i in range(n)), name


def test_world_report_writes_the_concept_as_the_runs_imagefolder(tmp_path):
    args = SimpleNamespace(dataset="imagefolder", data_dir=None, output_dir=str(tmp_path / "run"))
    world.use_concept_data(args)
    lines = (tmp_path / "run" / "concept_data" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == world.CONCEPT_TRAIN_N and "star" in json.loads(lines[0])["text"]
    args = SimpleNamespace(dataset="imagefolder", data_dir=None, output_dir=str(tmp_path / "b"), world_concept="cross")
    world.use_concept_data(args)
    assert "cross" in (tmp_path / "b" / "concept_data" / "metadata.jsonl").read_text()
    with pytest.raises(ValueError, match="expected dataset: imagefolder"):
        world.use_concept_data(SimpleNamespace(dataset="demo", data_dir=None, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="world_concept: expected one of"):
        world.use_concept_data(SimpleNamespace(dataset="imagefolder", data_dir=None, output_dir=str(tmp_path),
                                               world_concept="dragon"))


# ---------------------------------------------------------------------------------------------------------------------
# the judges' data
def test_judge_examples_label_every_hard_negative_none_and_named_shapes_by_name():
    examples = judges.example_set(600, seed=11)
    kinds = {e.kind for e in examples}
    assert kinds == set(judges.KINDS)
    none = judges.SHAPE_CLASSES.index(world.NONE)
    for e in examples:
        assert (e.shape == none) == (e.kind != "named"), e.kind
        assert e.image.size == (world.RESOLUTION, world.RESOLUTION)
    assert {e.colour for e in examples if e.kind in ("empty", "noise")} == {judges.IGNORE}
    assert len({judges.SHAPE_CLASSES[e.shape] for e in examples if e.kind == "named"}) == len(world.SHAPES)


def test_hard_negative_categories_are_deterministic_and_labelled():
    a = judges.hard_negative_examples("star6", 5)
    assert [np.asarray(e.image).tobytes() for e in a] == \
        [np.asarray(e.image).tobytes() for e in judges.hard_negative_examples("star6", 5)]
    assert all(judges.SHAPE_CLASSES[e.shape] == world.NONE for e in a)
    assert all(judges.SHAPE_CLASSES[e.shape] == "heart" for e in judges.hard_negative_examples("clear heart", 5))
    small = judges.hard_negative_examples("circle at 0.25x size", 5)  # 0.15 of the image: too small to be a circle
    assert all(judges.SHAPE_CLASSES[e.shape] == world.NONE for e in small)
    with pytest.raises(ValueError, match="category: expected one of"):
        judges.hard_negative_examples("dragon", 1)


# ---------------------------------------------------------------------------------------------------------------------
# statistics
def test_frechet_and_kid_equal_torchmetrics_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics_bridge import FeatureInput, feed, fid_metric, fid_value

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(0.2, 1.3, size=(250, 16)).astype(np.float32)
    fid = fid_metric(FeatureInput(16))
    feed(fid, a, True)
    feed(fid, b, False)
    assert world.frechet(a, b) == pytest.approx(fid_value(fid), rel=1e-6)
    with pytest.warns(UserWarning, match="extracted features"):
        kid = KernelInceptionDistance(feature=FeatureInput(16), subsets=1, subset_size=250)
    feed(kid, a[:250], True)
    feed(kid, b, False)
    assert world.kid(a[:250], b) == pytest.approx(float(kid.compute()[0]), rel=1e-4)
    assert abs(world.frechet(a, a)) < 1e-6


def test_frechet_against_a_precomputed_gaussian_is_the_same_number():
    from restune_diffusion.metrics.fid import Gaussian

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(500, 16)), rng.normal(0.1, 0.8, size=(200, 16)).astype(np.float32)
    stats = Gaussian.of(real)
    assert world.frechet(stats, fake) == pytest.approx(world.frechet(real, fake), rel=1e-12)
    assert Gaussian.of(stats) is stats
    assert world.frechet(stats, fake[:10]) == pytest.approx(world.frechet(real, fake[:10]), rel=1e-12)  # N < D


def test_the_worlds_frechet_and_kid_are_the_metrics_fid_and_kid():
    from restune_diffusion.metrics import fid, kid

    assert world.frechet is fid.fid_from_features and world.kid is kid.mmd2  # one implementation, issue 24


def test_bootstrap_interval_contains_the_value_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = [[rng.random(100) < 0.3 for _ in range(3)]]
    large = [[rng.random(3000) < 0.3 for _ in range(3)]]
    for strata in (small, large):
        point, lo, hi = world.bootstrap(strata, n_boot=500)
        assert lo <= point <= hi
    assert np.diff(world.bootstrap(large, n_boot=500)[1:]) < 0.5 * np.diff(world.bootstrap(small, n_boot=500)[1:])


def test_paired_bootstrap_of_a_set_against_itself_is_exactly_zero_and_finds_a_real_difference():
    rng = np.random.default_rng(1)
    a = [[rng.random(400) < 0.3 for _ in range(3)]]
    b = [[x | (rng.random(400) < 0.2) for x in a[0]]]  # b hits wherever a does, and more
    assert world.bootstrap(a, a, n_boot=200) == (0.0, 0.0, 0.0)
    point, lo, hi = world.bootstrap(b, a, n_boot=500)
    assert point > 0 and lo > 0
    with pytest.raises(ValueError, match="same strata, clusters and items"):
        world.bootstrap(a, [[x[:10] for x in a[0]]])


def test_debiased_fid_interval_contains_the_value():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(400, 8)), rng.normal(0.3, 1.1, size=(300, 8))
    stat = lambda _k, f: world.frechet(real, f)  # noqa: E731
    point, lo, hi = world.bootstrap([[fake[:150], fake[150:]]], statistic=stat, n_boot=300, debias=True)
    assert lo <= point <= hi


def test_measurement_round_trips_through_its_file(tmp_path):
    m = world.Measurement({"concept:star": {"shape": np.array([True, False]), "all": np.array([False, False]),
                                            "seen": np.array(["star", "none"]),
                                            "features": np.arange(8, dtype=np.float32).reshape(2, 4)}})
    m.save(tmp_path / "m.npz")
    back = world.Measurement.load(tmp_path / "m.npz")
    for key, value in m.sets["concept:star"].items():
        assert np.array_equal(back.sets["concept:star"][key], value), key
    assert back.accuracy("concept:star", "shape") == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# the shipped world: its judges and its base
@pytest.mark.slow
def test_the_shipped_judges_name_a_concept_only_when_one_is_there():
    """On a fresh draw of the hard-negative categories (its own seed): clear concepts named right, every other
    category rarely named a concept (bench/judge_tiny.py measures the shipped set at n = 500 against the targets)."""
    from restune_diffusion.models import load_model

    vae = load_model("tiny").vae
    sets = judges.hard_set(vae, 100, seed=99)
    for judge in world.load_judges():
        clear, false = judges.worst(judges.confusion(judge, sets=sets))
        assert clear >= 0.85 and false <= 0.1, (judge.kind, clear, false)


@pytest.mark.slow
def test_the_shipped_base_follows_its_prompts_and_never_draws_a_concept():
    from restune_diffusion.models import load_model

    judge, _ = world.load_judges()
    m, _ = world.measure(load_model("tiny"), judge, world.prompt_sets(world.CONCEPTS, 1, 2, 4))
    assert m.accuracy("kept") >= 0.95 and m.accuracy("heldout_combos") >= 0.85  # compositional, not a lookup
    for concept in world.CONCEPTS:
        assert m.accuracy(f"concept:{concept}", "shape") <= 0.1, concept  # never seen: never drawn
        assert m.accuracy(f"concept:{concept}", "colour") >= 0.9, concept  # an unknown word derails nothing else


@pytest.mark.slow
def test_the_quality_bench_quick_mode_writes_every_row_with_intervals(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "quality_tiny.py"), "--quick", "--jobs", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((tmp_path / "quality-tiny.json").read_text())
    assert list(table["rows"]) == ["base", "lora", "res_tuning"]
    for name, row in table["rows"].items():
        for key in ("concept_drawn", "all_right", "kept", "heldout_combos"):
            lo, hi = row["mean"][key]["ci95"]
            assert lo <= row["mean"][key]["mean"] <= hi, (name, key)
        assert row["concepts"]["star"]["n"] == 3 * 12 * 2  # 3 seeds x 12 prompts x 2 images (quick)
    assert table["ceiling"]["concepts"]["star"]["n"] == 72 and table["meta"]["cpu_hours"] > 0
    text = (tmp_path / "quality-tiny.md").read_text()
    assert "| ceiling (real images through the autoencoder) |" in text and "## The paper's FID orderings" in text
    assert "## Which differences are significant: all-right accuracy" in text and "| res_tuning | " in text
    # a fresh clone elsewhere holds only what git keeps of the cache (.gitignore): every run is found, nothing is
    # trained or generated again, and the table is the same
    import shutil

    clone = tmp_path / "clone"
    for path in (tmp_path / "quality-tiny-runs").rglob("*"):
        if path.is_file() and (path.name.startswith(("result-", "measurement-")) or path.name.endswith("_cpu.json")):
            (clone / path.relative_to(tmp_path)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, clone / path.relative_to(tmp_path))
    as_committed = [f"bench/results/{p.relative_to(clone)}" for p in clone.rglob("*") if p.is_file()]
    kept = subprocess.run(["git", "check-ignore", *as_committed], cwd=root, capture_output=True, text=True)
    rerun = subprocess.run([sys.executable, str(root / "bench" / "quality_tiny.py"), "--quick", "--jobs", "1",
                            "--out", str(clone)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "runs to do" not in rerun.stdout, rerun.stderr[-3000:]
    assert json.loads((clone / "quality-tiny.json").read_text())["rows"] == table["rows"]
    assert as_committed and kept.returncode == 1, kept.stdout + kept.stderr  # 1: git ignores none of them
    # --stage partial trains nothing and, with every run cached, gives the finished table's rows
    partial = subprocess.run([sys.executable, str(root / "bench" / "quality_tiny.py"), "--quick", "--jobs", "1",
                              "--stage", "partial", "--out", str(clone)], capture_output=True, text=True, timeout=600)
    assert partial.returncode == 0 and "runs to do" not in partial.stdout, partial.stderr[-3000:]
    written = json.loads((clone / "quality-tiny-partial.json").read_text())
    assert written["rows"] == table["rows"] and list(written["curves"]) == ["lora", "res_tuning"]
    assert written["meta"]["concepts"] == written["meta"]["all_concepts"] == ["star"]
    assert "PARTIAL" in (clone / "quality-tiny-partial.md").read_text()


def test_the_quality_bench_partial_stage_trains_nothing(tmp_path, monkeypatch):
    """With nothing cached, `--stage partial` stops at the sweep's first missing run and says so: no run folder."""
    from bench import quality_tiny

    for name in ("LR_GRID", "SWEEP_START", "REPEATS", "CURVE_STEPS"):  # --quick rebinds them: restore after
        monkeypatch.setattr(quality_tiny, name, getattr(quality_tiny, name))
    with pytest.raises(SystemExit, match="runs are not cached .*this stage measures nothing"):
        quality_tiny.main(["--quick", "--jobs", "1", "--stage", "partial", "--out", str(tmp_path)])
    assert not list(tmp_path.rglob("result-*.json")) and not list(tmp_path.rglob("train"))


def test_the_sweep_walks_toward_the_lower_domain_fid_where_no_lr_draws_the_concept(monkeypatch):
    """Prompt tuning drew no star or heart at any LR of the first rounds: every point tied at 0, and the walk stopped
    at whichever point came first. The domain FID of the validation images now orders such points (and breaks any
    tie), and the chosen LR's note says it was chosen that way; accuracy still comes first."""
    from bench import quality_tiny as Q

    fid = {1e-3: 90.0, 1e-2: 70.0, 3e-3: 80.0, 3e-2: 60.0, 1e-1: 65.0}
    grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)

    class Runner:
        def job(self, method, concept, lr, seed, steps, noise, repeats):
            return {"concept": concept, "lr": lr}

        def run(self, jobs):
            return [{"job": j, "accuracy": {f"concept:{j['concept']}": 0.0}, "shape": {f"concept:{j['concept']}": 0.0}}
                    for j in jobs]

    monkeypatch.setattr(Q, "validation_reference", lambda concept, repeats: None)
    monkeypatch.setattr(Q, "validation_fid", lambda runs, refs: fid[runs[0]["job"]["lr"]])
    scores = Q.sweep(Runner(), ["prompt"], ["star", "heart"], 400, grid, (1e-3, 1e-2))
    assert sorted(scores["prompt"]) == sorted(fid)  # walked up to 3e-2 and measured both its neighbours
    lr, note = Q.chosen_lr(scores["prompt"], grid)
    assert lr == 3e-2 and note == "interior; no LR drew the concept in any validation image: chosen by domain FID"
    drawn = {1e-3: {"all": 0.01, "shape": 0.02, "domain_fid": 150.0},
             1e-2: {"all": 0.0, "shape": 0.0, "domain_fid": 9.0}}
    assert Q.chosen_lr(drawn, grid) == (1e-3, "interior")


def test_the_significance_matrix_reads_each_pair_from_either_side():
    """The table holds each pair once ("a - b"); the matrix shows b vs a too, flipped, and calls an interval that
    straddles zero not distinguishable."""
    from bench import quality_tiny as Q

    table = {"rows": {"base": {}, "full": {}, "lora": {}},
             "comparisons": {"base - full": {"all_right": {"mean": -0.4, "ci95": [-0.45, -0.35]}},
                             "base - lora": {"all_right": {"mean": -0.1, "ci95": [-0.2, 0.05]}},
                             "full - lora": {"all_right": {"mean": 0.2, "ci95": [0.1, 0.3]}}}}
    lines = Q.significance_matrix(table, "all_right", lower_is_better=False)
    assert lines[2:] == ["| base |  | − | · |", "| full | + |  | + |", "| lora | · | − |  |"]
    lower = Q.significance_matrix(table, "all_right", lower_is_better=True)  # FID: a lower value is better
    assert lower[3] == "| full | − |  | − |"
