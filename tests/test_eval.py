"""The evaluation runner (restune_diffusion/evaluation): CLIP score, the COCO draw, several models x guidance scales,
per-checkpoint rows, N processes. Tiny SD at its native 32 px, 2 denoising steps, random Inception and CLIP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_fid import _coco, _image, weights  # noqa: F401  (weights: the random-Inception fixture)

import restune_diffusion as rd
from restune_diffusion.evaluation import coco
from restune_diffusion.evaluation.clip_score import CLIPScorer, resolve_clip_folder
from restune_diffusion.evaluation.runner import evaluate

REPO = Path(__file__).resolve().parents[1]
RUN = dict(steps=2, batch_size=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP saved as a local folder (model, tokenizer, image processor), as the flag expects."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from restune_diffusion.models import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tiny_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_score_equals_a_hand_computed_cosine(clip_dir):
    scorer = CLIPScorer(clip_dir)
    images = [_image(s, 48) for s in range(6)]
    texts = ["a red circle", "a blue square", "a green star", "a yellow shape", "red", "a blue star on green"]
    got = scorer.scores(images, texts)
    model, tok = scorer.model, scorer.tokenizer
    with torch.no_grad():
        pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
        text = tok(texts, padding=True, return_tensors="pt")
        image_features = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double()
        text_features = model.text_projection(model.text_model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output).double()
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    cosine = (image_features * text_features).sum(-1).numpy()
    np.testing.assert_allclose(got, 100 * np.maximum(cosine, 0), rtol=1e-6, atol=1e-9)
    assert got.shape == (6,) and (got >= 0).all()


def test_missing_clip_and_inception_folders_are_named_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("RESTUNE_CLIP_MODEL", raising=False)
    assert resolve_clip_folder(None) is None  # no CLIP score unless asked
    with pytest.raises(FileNotFoundError, match=r"--clip_model .*nope.*clip-vit-large-patch14.*config.json"):
        resolve_clip_folder(tmp_path / "nope")
    coco_dir = _coco(tmp_path / "coco", n=2)
    with pytest.raises(FileNotFoundError, match=r"missing.pth: no such file.*pt_inception-2015-12-05"):
        evaluate("tiny-random", coco_dir, tmp_path / "out", num_samples=2, inception_weights=tmp_path / "missing.pth",
                 **RUN)


def test_n_beyond_the_split_draws_captions_with_replacement_as_documented(tmp_path):
    root = _coco(tmp_path / "coco", n=3, year="2014")
    draw = coco.draw(root, 10, seed=4, year="2014")
    images = coco.read_captions(root, "2014")
    assert (draw.num_images_in_split, draw.with_replacement, len(draw.pairs)) == (3, 7, 10)
    assert draw.real_images == [p for p, _ in images]  # real statistics: the whole split, once each
    assert [p for p, _ in draw.pairs[:3]] == draw.real_images  # every image once first
    every = {(p, t) for p, texts in images for t in texts}
    assert all(pair in every for pair in draw.pairs)
    assert draw == coco.draw(root, 10, seed=4, year="2014")  # seeded
    assert draw.pairs[3:] != coco.draw(root, 10, seed=5, year="2014").pairs[3:]
    small = coco.draw(root, 2, seed=4, year="2014")
    assert small.with_replacement == 0 and len(set(small.real_images)) == 2
    with pytest.raises(FileNotFoundError, match="captions_val2017.json"):
        coco.draw(root, 2, year="2017")


def _tuner_file(path: Path, seed: int, kind: str = "res_adapter") -> Path:
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, {"type": kind, "dim": 4} if kind == "res_adapter" else {"type": kind})
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    return rd.save_tuners(path, handle)


def _rows(result):
    return {(r["model"], r["guidance_scale"]): r for r in result["rows"]}


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_two_tuners_and_base_in_one_sweep_equal_single_runs_and_plot_one_curve_per_model(
        tmp_path, weights, clip_dir, monkeypatch):  # noqa: F811
    import matplotlib.axes

    root = _coco(tmp_path / "coco", n=4)
    files = [_tuner_file(tmp_path / "out" / run / "tuners.safetensors", seed) for run, seed in (("a", 1), ("b", 2))]
    common = dict(num_samples=4, inception_weights=weights, clip_model=clip_dir, stats_cache_dir=tmp_path / "cache",
                  kid_subsets=5, **RUN)
    curves = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: curves.append(k["label"]) or plot(
        self, *a, **k))
    with pytest.warns(UserWarning, match="NOT comparable"):
        joint = evaluate("tiny-random", root, tmp_path / "joint", tuners=[str(f) for f in files], base=True,
                         guidance_scales=[1.0, 3.0, 7.5], **common)
    assert sorted(curves) == ["a", "b", "base"]
    out = tmp_path / "joint"
    assert Image.open(out / "fid_vs_clip.png").size[0] > 100
    table = (out / "eval.md").read_text()
    assert table.count("| base |") == 3 and "CLIP score" in table
    stored = json.loads((out / "eval.json").read_text())
    assert len(stored["rows"]) == 9 and stored["inception_sha256"] and stored["coco"]["year"] == "2017"
    assert stored["resolution"] == 32 and Image.open(out / "a" / "cfg7.5" / "00000.png").size == (32, 32)
    rows = _rows(joint)
    assert rows[("a", 7.5)]["fid"] != rows[("base", 7.5)]["fid"]
    assert rows[("base", 1.0)]["fid"] != rows[("base", 7.5)]["fid"]
    for name, tuners in (("base", None), ("a", [str(files[0])]), ("b", [str(files[1])])):
        single = evaluate("tiny-random", root, tmp_path / f"single_{name}", tuners=tuners, guidance_scales=[7.5],
                          **common)
        assert single["real_features_reused"]  # real features extracted once, then cached
        (row,) = single["rows"]
        for field in ("fid", "kid_mean", "kid_std", "clip_score", "n"):
            assert row[field] == pytest.approx(rows[(name, 7.5)][field], rel=1e-6, abs=1e-9), (name, field)


def test_per_checkpoint_mode_gives_one_row_per_checkpoint_in_step_order(tmp_path, weights):  # noqa: F811
    root = _coco(tmp_path / "coco", n=2)
    for step, seed in ((20, 1), (5, 2), (100, 3)):
        _tuner_file(tmp_path / "run" / f"checkpoint-{step}" / "tuners.safetensors", seed)
    result = evaluate("tiny-random", root, tmp_path / "eval", tuners=[str(tmp_path / "run" / "checkpoint-*")],
                      num_samples=2, inception_weights=weights, stats_cache_dir=tmp_path / "cache", kid_subsets=2,
                      **RUN)
    assert [(r["model"], r["step"]) for r in result["rows"]] == [
        ("checkpoint-5", 5), ("checkpoint-20", 20), ("checkpoint-100", 100)]
    assert len({r["fid"] for r in result["rows"]}) == 3


def test_per_checkpoint_mode_plots_fid_and_clip_against_step_one_curve_per_run(
        tmp_path, weights, clip_dir, monkeypatch):  # noqa: F811
    import matplotlib.axes

    root = _coco(tmp_path / "coco", n=2)
    for run, steps in (("a", (20, 5)), ("b", (10,))):
        for step in steps:
            _tuner_file(tmp_path / "out" / run / f"checkpoint-{step}" / "tuners.safetensors", step)
    curves = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, xs, ys, *a, **k: curves.append(
        (k["label"], list(xs), list(ys))) or plot(self, xs, ys, *a, **k))
    runs = [str(tmp_path / "out" / run / "checkpoint-*") for run in ("a", "b")]
    result = evaluate("tiny-random", root, tmp_path / "eval", tuners=runs, base=True, num_samples=2,
                      inception_weights=weights, clip_model=clip_dir, stats_cache_dir=tmp_path / "cache", kid_subsets=2,
                      **RUN)
    assert [(r["model"], r["step"]) for r in result["rows"]] == [
        ("base", None), ("a/checkpoint-5", 5), ("a/checkpoint-20", 20), ("b/checkpoint-10", 10)]
    assert Image.open(tmp_path / "eval" / "fid_vs_step.png").size[0] > 100
    rows = _rows(result)
    by_run = [(label, xs, ys) for label, xs, ys in curves if label in ("a", "b")]
    fid = [(run, steps, [rows[(f"{run}/checkpoint-{s}", 7.5)]["fid"] for s in steps])
           for run, steps in (("a", [5, 20]), ("b", [10]))]
    clip = [(run, xs, [rows[(f"{run}/checkpoint-{s}", 7.5)]["clip_score"] for s in xs]) for run, xs, _ in fid]
    assert by_run == fid + clip  # the FID panel, then the CLIP panel: one point per checkpoint, in step order
    assert (tmp_path / "eval" / "a" / "checkpoint-5" / "cfg7.5" / "00000.png").is_file()


def _cli(out: Path, root: Path, weights: Path, clip_dir: Path, launcher: list[str]):  # noqa: F811
    cmd = launcher + [str(REPO / "eval_fid.py"), "--pretrained_model_name_or_path", "tiny-random",
                      "--coco_dir", str(root),
                      "--num_samples", "6", "--steps", "2", "--batch_size", "2", "--inception_weights", str(weights),
                      "--clip_model", str(clip_dir), "--kid_subsets", "5", "--guidance_scale", "3", "7.5",
                      "--stats_cache_dir", str(out / "cache"), "--output_dir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())


@pytest.mark.slow  # two torchrun processes + one: ~35 s on 2 idle cores
def test_two_processes_give_the_one_process_result(tmp_path, weights, clip_dir):  # noqa: F811
    root = _coco(tmp_path / "coco", n=6)
    one = _cli(tmp_path / "one", root, weights, clip_dir, [sys.executable])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _cli(tmp_path / "two", root, weights, clip_dir, torchrun)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for field in ("model", "guidance_scale", "fid", "kid_mean", "kid_std", "clip_score", "n"):
            assert a[field] == b[field], field
    for scale in ("cfg3", "cfg7.5"):
        for i in range(6):
            name = Path("base") / scale / f"{i:05d}.png"
            assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)),
                                  np.asarray(Image.open(tmp_path / "two" / name))), name
