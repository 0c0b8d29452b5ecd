"""A hub id in the local Hugging Face cache as --pretrained_model_name_or_path, with --revision and --variant (issue 17,
"Base model"), on a fake cache the tests write from the tiny model in huggingface_hub's layout."""

from pathlib import Path

import pytest
import torch
from test_fid import weights  # noqa: F401 (the random-Inception fixture)

from restune_diffusion import hub
from restune_diffusion.models import build_tiny_sd, load_model, resolve_model

REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def save_snapshot(folder: Path, sd, variant: str | None = None) -> None:
    """The components as a hub snapshot: diffusers' layout, weights in `variant` files when given (fp16-only repos)."""
    half = variant == "fp16"
    for sub, module in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        module = module.to(torch.float16) if half else module
        module.save_pretrained(folder / sub, variant=variant)
        module.to(torch.float32)
    sd.tokenizer.save_pretrained(folder / "tokenizer")
    sd.noise_scheduler.save_pretrained(folder / "scheduler")


def write_cache(cache: Path, repo_id: str = REPO_ID, snapshots: dict | None = None, refs: dict | None = None) -> Path:
    """`cache/models--org--name/` with snapshots {commit: (components, variant)} and refs {branch or tag: commit}."""
    repo = hub.repo_folder(cache, repo_id)
    for commit, (sd, variant) in (snapshots or {}).items():
        save_snapshot(repo / "snapshots" / commit, sd, variant)
    for ref, commit in (refs or {}).items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.fixture(scope="module")
def two_bases():
    return build_tiny_sd(seed=0), build_tiny_sd(seed=1)


def same_unet(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_hub_id_loads_from_the_cache_offline_at_main_a_tag_or_a_commit(tmp_path, clean_env, two_bases):
    first, second = two_bases
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    write_cache(tmp_path / "cache", snapshots={COMMIT_A: (first, None), COMMIT_B: (second, None)},
                refs={"main": COMMIT_B, "v1": COMMIT_A})
    sd = load_model(REPO_ID)
    assert sd.name == REPO_ID and same_unet(sd.unet, second.unet)  # main -> commit b
    assert same_unet(load_model(REPO_ID, revision="v1").unet, first.unet)  # a tag
    assert same_unet(load_model(REPO_ID, revision=COMMIT_A).unet, first.unet)  # a commit hash
    assert resolve_model(REPO_ID) == hub.repo_folder(tmp_path / "cache", REPO_ID) / "snapshots" / COMMIT_B


def test_every_cache_location_is_searched_hf_home_and_the_default(tmp_path, clean_env, two_bases):
    write_cache(tmp_path / "home" / ".cache" / "huggingface" / "hub", snapshots={COMMIT_A: (two_bases[0], None)},
                refs={"main": COMMIT_A})
    assert resolve_model(REPO_ID).name == COMMIT_A  # ~/.cache/huggingface/hub
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    write_cache(tmp_path / "hf" / "hub", snapshots={COMMIT_B: (two_bases[1], None)}, refs={"main": COMMIT_B})
    assert resolve_model(REPO_ID).name == COMMIT_B  # $HF_HOME/hub comes first


def test_an_fp16_only_snapshot_loads_with_variant_fp16_and_names_the_flag_without_it(tmp_path, clean_env, two_bases):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    write_cache(tmp_path / "cache", snapshots={COMMIT_A: (two_bases[0], "fp16")}, refs={"main": COMMIT_A})
    files = sorted(p.name for p in (resolve_model(REPO_ID) / "unet").iterdir())
    assert "diffusion_pytorch_model.fp16.safetensors" in files
    sd = load_model(REPO_ID, variant="fp16")
    assert sd.unet.dtype == torch.float32  # fp16 files, loaded in the asked dtype
    expected = two_bases[0].unet.state_dict()
    for key, value in sd.unet.state_dict().items():
        torch.testing.assert_close(value, expected[key].half().float(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"unet: no plain weight files .* pass --variant fp16"):
        load_model(REPO_ID)


def test_a_missing_variant_names_what_the_snapshot_has(tmp_path, clean_env, two_bases):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    write_cache(tmp_path / "cache", snapshots={COMMIT_A: (two_bases[0], None)}, refs={"main": COMMIT_A})
    with pytest.raises(FileNotFoundError, match=r"no 'fp16' weight files .* pass no --variant"):
        load_model(REPO_ID, variant="fp16")


def test_a_model_in_no_cache_is_an_error_listing_every_place_looked(tmp_path, clean_env):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as err:
        load_model(REPO_ID)
    message = str(err.value)
    for place in (tmp_path / "cache", tmp_path / "hf" / "hub", tmp_path / "home" / ".cache" / "huggingface" / "hub"):
        assert str(hub.repo_folder(place, REPO_ID)) in message
    assert "Nothing is downloaded here" in message and "huggingface-cli download" in message


def test_an_unknown_revision_lists_the_cached_ones(tmp_path, clean_env, two_bases):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    write_cache(tmp_path / "cache", snapshots={COMMIT_A: (two_bases[0], None)}, refs={"main": COMMIT_A})
    with pytest.raises(FileNotFoundError, match=r"revision 'v2' of .* has revisions main, aaaaaaaaaaaa\.\.\."):
        load_model(REPO_ID, revision="v2")


def test_revision_on_a_local_folder_or_tiny_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a local path, used as it is"):
        resolve_model(tmp_path, revision="main")
    with pytest.raises(ValueError, match="not to the built-in 'tiny-random'"):
        load_model("tiny-random", variant="fp16")


@pytest.mark.parametrize("name,repo", [("org/name", True), ("gpt2", True), ("/abs/path", False), ("./rel", False),
                                       ("a/b/c", False), ("org--x/y", False), ("a/../b", False)])
def test_hub_ids_are_told_from_paths(name, repo):
    assert hub.is_repo_id(name) is repo


def test_shard_and_variant_names():
    assert hub.variant_of("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert hub.variant_of("diffusion_pytorch_model.safetensors") is None
    assert hub.variant_of("model.fp16-00001-of-00002.safetensors") == "fp16"
    assert hub.variant_of("model-00001-of-00002.safetensors") is None


def test_train_and_generate_take_a_cached_hub_id_with_revision_and_variant(tmp_path, clean_env, two_bases):
    from test_train import cli_args

    from restune_diffusion import train as T
    from restune_diffusion.data import make_demo_dataset
    from restune_diffusion.weights import read_tuner_header

    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    write_cache(tmp_path / "cache", snapshots={COMMIT_A: (two_bases[0], "fp16")}, refs={"v1": COMMIT_A})
    data = make_demo_dataset(tmp_path / "data", num_images=4, resolution=32)
    argv = cli_args(tmp_path, data, "--max_train_steps", "1", "--checkpointing_steps", "0")
    argv[argv.index("tiny-random")] = REPO_ID
    argv.remove("--resolution")
    argv.remove("32")  # read from the cached snapshot's configs
    args = T.parse_args(argv + ["--revision", "v1", "--variant", "fp16"])
    assert args.resolution == 32
    try:
        summary = T.train(args)
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert summary["base_model"] == {"name": REPO_ID, "revision": "v1", "variant": "fp16",
                                     "fingerprint": summary["base_model"]["fingerprint"]}
    _, meta = read_tuner_header(tmp_path / "out" / "tuners.safetensors")
    assert (meta["base_model"], meta["base_model_revision"], meta["base_model_variant"]) == (REPO_ID, "v1", "fp16")
    assert f"load_pipeline('{REPO_ID}', " in (tmp_path / "out" / "README.md").read_text()
    assert "revision='v1', variant='fp16')" in (tmp_path / "out" / "README.md").read_text()

    import generate

    generate.main(["--pretrained_model_name_or_path", REPO_ID, "--revision", "v1", "--variant", "fp16", "--tuners",
                   str(tmp_path / "out" / "tuners.safetensors"), "--prompt", "a red circle", "--num_images", "1",
                   "--steps", "2", "--out", str(tmp_path / "samples")])
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 1


def test_eval_fid_passes_revision_and_variant_to_the_model_loader(tmp_path, monkeypatch, weights):  # noqa: F811
    from test_fid import _coco

    import eval_fid
    from restune_diffusion.evaluation import runner

    class Loaded(Exception):
        pass

    def load(name, **kwargs):
        raise Loaded(name, kwargs["revision"], kwargs["variant"])

    monkeypatch.setattr(runner, "load_model", load)
    coco_dir = _coco(tmp_path / "coco", n=2)
    with pytest.raises(Loaded) as got:
        eval_fid.main(["--pretrained_model_name_or_path", REPO_ID, "--revision", "v1", "--variant", "fp16",
                       "--coco_dir", str(coco_dir), "--num_samples", "2", "--inception_weights", str(weights),
                       "--output_dir", str(tmp_path / "eval")])
    assert got.value.args == (REPO_ID, "v1", "fp16")
