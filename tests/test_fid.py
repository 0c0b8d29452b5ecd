"""FID (restune_diffusion/evaluation/: inception, features, images; restune_diffusion/metrics: FID and KID from
features; eval_fid.py) with random Inception weights in the standard layout, tiny images."""

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torchmetrics_bridge import FeatureInput, feed, fid_metric, fid_value

from restune_diffusion import files
from restune_diffusion.evaluation import features
from restune_diffusion.evaluation import images as image_files
from restune_diffusion.evaluation import inception as fid_inception
from restune_diffusion.metrics import fid, kid

REPO = Path(__file__).resolve().parents[1]
KEYS_FILE = Path(__file__).parent / "data" / "fid_inception_keys.txt"  # copy of shared/fid_inception_keys.txt


def _expected_layout() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(int(d) for d in re.findall(r"\d+", shape))))
    return rows


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random FID Inception weights saved as pytorch-fid's file is: torch.save of the state dict.

    He-normal convs: torch's default init shrinks the signal ~3x per layer, and after 94 convs every image gives the
    same features (FID ~1e-13); with He init features depend on the image as trained ones do.
    """
    torch.manual_seed(0)
    model = fid_inception.FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / fid_inception.WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(weights):
    return fid_inception.load_fid_inception(weights)


def _image(seed: int, size: int = 32) -> Image.Image:
    """Smooth random colours: an 4x4 grid of colours upscaled, so images differ in content, not just noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def _write_images(folder: Path, seeds, suffix: str = ".png", size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seed in enumerate(seeds):
        paths.append(folder / f"{i:05d}{suffix}")
        _image(seed, size).save(paths[-1])
    return paths


def _batch(images) -> torch.Tensor:
    """PIL images -> (B, 3, 299, 299) uint8 through the protocol's resize."""
    arrays = [np.asarray(fid_inception.square_resize(im, fid_inception.INCEPTION_SIZE)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# the extractor and its weights
def test_state_dict_keys_and_shapes_equal_the_standard_fid_inception_layout():
    model = fid_inception.FIDInceptionV3()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == _expected_layout()
    assert len(got) == 566


def test_loader_accepts_a_file_without_num_batches_tracked(weights, tmp_path):
    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if "num_batches_tracked" not in k}
    assert len(state) == 566 - 94
    path = tmp_path / "no_nbt.pth"
    torch.save(state, path)
    model = fid_inception.load_fid_inception(path)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])


def test_loader_reads_safetensors(weights, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(weights, weights_only=True)
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = fid_inception.load_fid_inception(path)
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_loader_names_the_key_and_both_shapes_on_a_shape_mismatch(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(128, 128, 7, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight: shape \(128, 128, 7, 1\) in file "
                                         r"vs \(128, 128, 1, 7\)"):
        fid_inception.load_fid_inception(path)


def test_loader_rejects_missing_and_unexpected_keys(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state["AuxLogits.fc.weight"] = state.pop("fc.weight")
    path = tmp_path / "torchvision_like.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 keys missing \['fc.weight'\], 1 unexpected \['AuxLogits.fc.weight'\]"):
        fid_inception.load_fid_inception(path)


def test_missing_weights_error_names_the_file_where_to_get_it_and_the_flag(monkeypatch, tmp_path):
    monkeypatch.delenv(fid_inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        fid_inception.load_fid_inception()
    message = str(err.value)
    for part in (fid_inception.WEIGHTS_FILE, fid_inception.WEIGHTS_URL, "--inception_weights",
                 fid_inception.WEIGHTS_ENV):
        assert part in message
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pth"))):
        fid_inception.load_fid_inception(tmp_path / "nope.pth")


def test_weights_path_from_the_environment_variable(weights, monkeypatch):
    monkeypatch.setenv(fid_inception.WEIGHTS_ENV, str(weights))
    assert fid_inception.resolve_inception_weights() == weights


def test_extractor_gives_float32_pool3_from_uint8_or_float_values_and_resizes_other_sizes(inception):
    x = _batch([_image(1), _image(2)])  # (2, 3, 299, 299) uint8
    with torch.no_grad():
        from_uint8, from_float = inception(x), inception(x.float())
        small = inception(torch.from_numpy(np.stack([np.asarray(_image(1))])).permute(0, 3, 1, 2))
    assert from_uint8.shape == (2, fid_inception.NUM_FEATURES) and from_uint8.dtype == torch.float32
    assert torch.equal(from_uint8, from_float)
    assert small.shape == (1, fid_inception.NUM_FEATURES) and torch.isfinite(small).all()


def test_tf32_is_off_inside_and_restored_after():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        with fid.tf32_disabled():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------------------------------
# The statistic: one real set and three fake sets, brightness-shifted by 0 (the real set itself), 45 and 90.
# Each FID costs torchmetrics one eigvals of a 2048 x 2048 float64 matrix (seconds on 2 CPU cores): few computes here.
SHIFTS = (0, 45, 90)


@pytest.fixture(scope="module")
def shifted_runs(inception):
    """FID per shift and the features each set produced (captured at the extractor's output)."""
    real = _batch([_image(s) for s in range(4)])
    captured = []
    hook = inception.register_forward_hook(lambda m, i, out: captured.append(out.detach().double()))
    metric = fid_metric(inception)
    try:
        with torch.no_grad():
            metric.update(real, real=True)
            fids = []
            for shift in SHIFTS:
                metric.reset()  # reset_real_features=False: the real statistics stay
                metric.update((real.int() + shift).clamp(0, 255).to(torch.uint8), real=False)
                fids.append(fid_value(metric))
    finally:
        hook.remove()
    return {"fid": fids, "real": captured[0], "fake": captured[1:], "metric": metric}


def test_fid_of_a_set_against_itself_is_zero(shifted_runs):
    assert abs(shifted_runs["fid"][0]) < 1e-3


def test_fid_rises_as_the_fake_set_is_shifted_further(shifted_runs):
    values = shifted_runs["fid"]
    assert values[0] < values[1] < values[2], values
    assert values[1] > 1.0


def test_statistics_accumulate_in_float64(shifted_runs):
    metric = shifted_runs["metric"]
    assert metric.real_features_sum.dtype == torch.float64
    assert metric.real_features_cov_sum.dtype == torch.float64
    assert metric.fake_features_cov_sum.dtype == torch.float64


def _scipy_fid(f1: np.ndarray, f2: np.ndarray, full: bool) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2) with scipy.linalg.sqrtm.

    full=False uses tr sqrtm(S1 S2) = tr sqrtm(M M^T), M = A1 A2^T for S = A^T A (A: centred features / sqrt(n - 1)):
    S1 S2 and M M^T share their non-zero eigenvalues, and M M^T is n x n, so sqrtm takes milliseconds, not 15 s.
    """
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = (f1 - mu1) / np.sqrt(len(f1) - 1), (f2 - mu2) / np.sqrt(len(f2) - 1)
    s1, s2 = a1.T @ a1, a2.T @ a2
    product = s1 @ s2 if full else (a1 @ a2.T) @ (a1 @ a2.T).T
    root = scipy.linalg.sqrtm(product)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def test_fid_equals_a_scipy_sqrtm_reference_on_the_same_features(shifted_runs):
    real, fake = shifted_runs["real"].numpy(), shifted_runs["fake"][1].numpy()
    assert shifted_runs["fid"][1] == pytest.approx(_scipy_fid(real, fake, full=False), rel=1e-4)


@pytest.mark.slow
def test_fid_equals_the_full_2048_sqrtm_reference(shifted_runs):
    real, fake = shifted_runs["real"].numpy(), shifted_runs["fake"][1].numpy()
    assert shifted_runs["fid"][1] == pytest.approx(_scipy_fid(real, fake, full=True), rel=1e-4)


def test_fid_from_features_equals_torchmetrics_through_the_extractor(shifted_runs):
    real, fake = shifted_runs["real"].float().numpy(), shifted_runs["fake"][1].float().numpy()
    assert fid.fid_from_features(real, fake) == pytest.approx(shifted_runs["fid"][1], rel=1e-5)


@pytest.mark.slow  # over 5 s on 2 cores: the default suite stays under 5 minutes
def test_low_rank_fid_equals_torchmetrics_on_the_same_features():
    from restune_diffusion.metrics.fid import low_rank_fid

    rng = np.random.default_rng(0)
    real = rng.random((6, fid_inception.NUM_FEATURES)).astype(np.float32)
    fake = (rng.random((7, fid_inception.NUM_FEATURES)) * 1.2 + 0.1).astype(np.float32)
    metric = fid_metric(FeatureInput(fid_inception.NUM_FEATURES))
    feed(metric, real, True)
    feed(metric, fake, False)
    assert low_rank_fid(real, fake) == pytest.approx(fid_value(metric), rel=1e-5)


def test_kid_repeats_with_its_seed_and_grows_with_the_shift(shifted_runs):
    real = shifted_runs["real"].float().numpy()
    near, far = (shifted_runs["fake"][i].float().numpy() for i in (0, 1))
    first = kid.kid_from_features(real, far, subsets=10, subset_size=4, seed=1)
    assert first == kid.kid_from_features(real, far, subsets=10, subset_size=4, seed=1)
    assert first[2] == 4 and first[0] > kid.kid_from_features(real, near, subsets=10, subset_size=4, seed=1)[0]


def test_kid_equals_torchmetrics_kid_on_the_same_subsets(shifted_runs):
    """Ours (float64 MMD^2) draws the subsets torchmetrics draws under torch.manual_seed(seed)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, far = shifted_runs["real"].float().numpy(), shifted_runs["fake"][1].float().numpy()
    with pytest.warns(UserWarning, match="extracted features"):
        metric = KernelInceptionDistance(feature=FeatureInput(real.shape[1]), subsets=10, subset_size=3)
    feed(metric, real, True)
    feed(metric, far, False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        mean, std = metric.compute()
    ours = kid.kid_from_features(real, far, subsets=10, subset_size=3, seed=1)
    assert ours[:2] == pytest.approx((float(mean), float(std)), rel=1e-4) and ours[2] == 3


# ---------------------------------------------------------------------------------------------------------------------
# hostile files: weights and caches (issue 13 item 15, issue 15)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "truncated_safetensors"])
def test_a_corrupt_inception_file_is_a_named_error(weights, tmp_path, damage):
    data = weights.read_bytes()
    if damage == "truncated":
        path, content = tmp_path / fid_inception.WEIGHTS_FILE, data[: len(data) // 2]
    elif damage == "garbage":
        path, content = tmp_path / fid_inception.WEIGHTS_FILE, os.urandom(4096)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "inception.safetensors"
        save_file({k: v.contiguous() for k, v in torch.load(weights, weights_only=True).items()}, str(path))
        content = path.read_bytes()[:100_000]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        fid_inception.load_fid_inception(path)


def test_inception_weights_other_than_the_standard_file_give_a_loud_warning(weights):
    with pytest.warns(UserWarning, match="NOT comparable with published"):
        message = fid_inception.weights_hash_warning(files.file_sha256(weights), weights)
    assert fid_inception.WEIGHTS_SHA256[:16] in message
    assert fid_inception.weights_hash_warning(fid_inception.WEIGHTS_SHA256, weights) is None


def test_features_cache_round_trips_and_a_corrupt_or_foreign_one_is_recomputed(tmp_path):
    key = {"n": 3}
    path = features.features_cache_path(tmp_path, key)
    values = np.random.default_rng(0).random((3, 8)).astype(np.float32)
    features.save_cached_features(path, key, values)
    assert np.array_equal(features.load_cached_features(path, key), values)
    with pytest.warns(UserWarning, match="another protocol key"):
        assert features.load_cached_features(path, {"n": 4}) is None
    path.write_bytes(path.read_bytes()[:50])  # torn
    with pytest.warns(UserWarning, match="unreadable real-features cache"):
        assert features.load_cached_features(path, key) is None
    path.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="recomputing"):
        assert features.load_cached_features(path, key) is None


def test_folder_listing_leaves_out_generate_pys_grid(tmp_path):
    _write_images(tmp_path, range(3))
    _image(9, 64).save(tmp_path / "grid.png")
    assert [p.name for p in image_files.list_images(tmp_path, "--fake_dir")] == ["00000.png", "00001.png", "00002.png"]


def test_small_n_warnings_are_loud_and_recorded():
    with pytest.warns(UserWarning) as record:
        messages = features.sample_size_warnings(1000)
    assert len(messages) == 2 and len(record) == 2
    assert "biased upward" in messages[0] and "N=1000" in messages[0]
    assert "rank-deficient" in messages[1]
    assert features.sample_size_warnings(5000) == []


def test_resume_into_a_folder_made_with_other_settings_is_refused(tmp_path):
    record = {"seed": 0, "steps": 50}
    image_files.check_generation_record(tmp_path, record)
    image_files.check_generation_record(tmp_path, dict(record))
    with pytest.raises(ValueError, match="steps: 50 there vs 20 now"):
        image_files.check_generation_record(tmp_path, {**record, "steps": 20})


def _coco(root: Path, n: int = 8, year: str = "2017") -> Path:
    """A COCO-format folder: annotations/captions_val{year}.json and val{year}/*.jpg, two captions per image."""
    files = _write_images(root / f"val{year}", range(100, 100 + n), suffix=".jpg", size=40)
    images = [{"id": 10 + i, "file_name": p.name} for i, p in enumerate(files)]
    words = ["red", "blue", "green", "yellow"]
    annotations = [{"id": 1000 + 2 * i + j, "image_id": 10 + i, "caption": f"a {words[(i + j) % 4]} shape"}
                   for i in range(n) for j in range(2)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_val{year}.json").write_text(json.dumps({"images": images,
                                                                               "annotations": annotations}))
    return root


def _eval_fid_main():
    spec = importlib.util.spec_from_file_location("eval_fid", REPO / "eval_fid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_eval_fid_cli_folder_mode_writes_eval_json_and_skips_bad_images_when_asked(weights, tmp_path):
    _write_images(tmp_path / "a", range(3))
    _write_images(tmp_path / "b", range(3, 6), suffix=".jpg", size=48)
    (tmp_path / "a" / "00003.png").write_bytes(b"\x89PNG broken")
    args = ["--real_dir", str(tmp_path / "a"), "--fake_dir", str(tmp_path / "b"), "--inception_weights",
            str(weights), "--output_dir", str(tmp_path / "out"), "--batch_size", "6", "--device", "cpu"]
    with pytest.raises(ValueError, match="00003.png.*--skip_bad_images"):
        _eval_fid_main()(args)
    with pytest.warns(UserWarning, match="rank-deficient"):
        result = _eval_fid_main()(args + ["--skip_bad_images"])
    stored = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert stored["fid"] == pytest.approx(result["fid"]) and stored["fid"] > 0
    assert (stored["mode"], stored["n_real"], stored["n_fake"], stored["skipped_images"]) == ("folders", 3, 3, 1)
    assert any("NOT comparable" in w for w in stored["warnings"])


def test_eval_fid_cli_errors_name_the_flag_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv(fid_inception.WEIGHTS_ENV, raising=False)
    main = _eval_fid_main()
    _write_images(tmp_path / "a", range(2))
    with pytest.raises(FileNotFoundError) as err:
        main(["--real_dir", str(tmp_path / "a"), "--fake_dir", str(tmp_path / "a")])
    assert fid_inception.WEIGHTS_FILE in str(err.value) and "--inception_weights" in str(err.value)
    with pytest.raises(FileNotFoundError, match="--real_dir .*missing"):
        main(["--real_dir", str(tmp_path / "missing"), "--fake_dir", str(tmp_path / "a"),
              "--inception_weights", str(KEYS_FILE)])
    with pytest.raises(SystemExit) as exit_:
        main(["--real_dir", str(tmp_path / "a")])
    assert exit_.value.code == 2  # argparse: --fake_dir missing
