"""Tuner files: round trip, the header, and clear refusals."""

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from conftest import run_unet
from restune_diffusion.attach import attach, select_blocks
from restune_diffusion.files import atomic_write_text
from restune_diffusion.models import build_unet, tiny_unet_config
from restune_diffusion.placement import unet_fingerprint
from restune_diffusion.weights import FORMAT, load_tuners, safe_file_pattern, save_tuners

CONFIG = [{"type": "res_adapter", "dim": 4, "targets": ["ff", "attn2"]}, {"type": "res_prompt", "num_tokens": 3},
          {"type": "lora", "rank": 2, "blocks": "mid"}]


@pytest.fixture
def saved(unet, tmp_path):
    handle = attach(unet, CONFIG, name="style")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_tuners(tmp_path / "out" / "tuners.safetensors", handle)
    return handle, path


def test_save_load_round_trip_gives_identical_outputs(saved, unet, unet_inputs):
    handle, path = saved
    expected = run_unet(unet, unet_inputs)
    handle.detach()
    loaded = load_tuners(unet, path)
    assert loaded.name == "style"
    assert torch.equal(run_unet(unet, unet_inputs), expected)


def test_file_holds_only_tuner_tensors_and_its_config(saved, unet):
    handle, path = saved
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(handle.state_dict())
    assert not keys & set(unet.state_dict())
    assert meta["format"] == FORMAT and meta["base_fingerprint"] == unet_fingerprint(unet)
    assert [c["type"] for c in json.loads(meta["tuners"])] == ["res_adapter", "res_prompt", "lora"]
    assert int(meta["num_tensors"]) == len(keys)
    assert [p.name for p in path.parent.iterdir()] == ["tuners.safetensors"]  # no temp file left


def test_a_file_for_another_architecture_names_base_tensor_and_shapes(saved):
    _, path = saved
    other = build_unet({**tiny_unet_config(), "cross_attention_dim": 48, "block_out_channels": (32, 64, 96)})
    with pytest.raises(ValueError) as err:
        load_tuners(other, path)
    text = str(err.value)
    assert "made for another UNet architecture" in text and "block_out_channels=[32, 64, 96]" in text
    assert "shape (" in text and "in model" in text and ".weight" in text
    assert not getattr(other, "_restune_sets", {})  # nothing half-attached


@pytest.mark.parametrize("damage", ["truncate", "garbage", "plain_safetensors"])
def test_broken_or_foreign_files_are_refused_cleanly(saved, unet, tmp_path, damage):
    handle, path = saved
    handle.detach()
    bad = tmp_path / "bad.safetensors"
    if damage == "truncate":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(b"not a safetensors file at all")
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=str(bad)):
        load_tuners(unet, bad)
    assert not getattr(unet, "_restune_sets", {})


def test_missing_file_is_named(unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tuners(unet, tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# tuner files from strangers (issue 13, items 6-9) and file hygiene (item 14)
def rewrite(path, out, tensors=None, **meta_changes):
    """A copy of tuner file `path` at `out` with other metadata (and tensors)."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors if tensors is not None else load_file(str(path)), str(out), metadata={**meta, **meta_changes})
    return out


def run_python(code: str, timeout: float = 60):
    """A fresh process (a hang is killed at the timeout; its memory is its own)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_file_stores_exact_block_names_and_round_trips(unet, unet_inputs, tmp_path):
    handle = attach(unet, [{"type": "lora", "rank": 2, "blocks": r"^up_blocks\.1\."}], name="x")
    chosen = [n for n, _ in select_blocks(unet, r"^up_blocks\.1\.")]
    path = save_tuners(tmp_path / "t.safetensors", handle)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["tuners"])[0]["blocks"] == chosen  # names, not the regex
    expected = run_unet(unet, unet_inputs)
    handle.detach()
    loaded = load_tuners(unet, path)
    assert sorted({k.split(".to_")[0].rsplit(".attn", 1)[0] for k in loaded.state_dict()}) == chosen
    assert torch.equal(run_unet(unet, unet_inputs), expected)


def test_redos_pattern_in_a_file_is_refused_fast(saved, tmp_path):
    _, path = saved
    configs = [{"type": "lora", "rank": 2, "blocks": r"^([\w.]+[\w.]+)+!"}]
    evil = rewrite(path, tmp_path / "evil.safetensors", tuners=json.dumps(configs))
    code = ("from restune_diffusion.models import build_tiny_sd\nfrom restune_diffusion.weights import load_tuners\n"
            f"try:\n    load_tuners(build_tiny_sd(0).unet, {str(evil)!r})\nexcept ValueError as e:\n    print(e)\n")
    done = run_python(code, timeout=60)  # before the fix: hours of backtracking on 2**40 paths per block name
    assert done.returncode == 0, done.stderr
    assert f"{evil}: tuner config" in done.stdout and "not a pattern a file may carry" in done.stdout


@pytest.mark.parametrize("pattern, ok", [("mid", True), (r"^down_blocks\.1\.", True), (r"up_blocks\.[12].*", True),
                                         (r"^([\w.]+[\w.]+)+!", False), (r"\w*\w*\w*!", False), ("a{1,99}", False),
                                         ("x" * 300, False), ("[", False)])
def test_safe_file_pattern(pattern, ok):
    assert safe_file_pattern(pattern) is ok


def test_huge_dim_in_header_fails_fast_without_allocating(saved, tmp_path):
    _, path = saved
    configs = [{"type": "res_adapter", "dim": 2**40, "targets": ["ff", "attn2"]}, {"type": "res_prompt",
                                                                                   "num_tokens": 3},
               {"type": "lora", "rank": 2, "blocks": "mid"}]
    bomb = rewrite(path, tmp_path / "bomb.safetensors", tuners=json.dumps(configs))
    code = ("import resource\nfrom restune_diffusion.models import build_tiny_sd\n"
            "from restune_diffusion.weights import load_tuners\nunet = build_tiny_sd(0).unet\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    load_tuners(unet, {str(bomb)!r})\nexcept ValueError as e:\n    print(e)\n"
            "print('GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    done = run_python(code)  # an allocation of the header's 140 TB would fail or swap for long past the timeout
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"{bomb} does not fit" in out and "res_adapter.down.weight: shape (4, 32)" in out and "1099511627776" in out
    assert int(out.split("GROWTH_KB")[1].split()[0]) < 200_000  # < 200 MB (the header asks for 140 TB)


def test_nonfinite_tensors_are_refused_by_name_unless_allowed(saved, unet, tmp_path, caplog):
    handle, path = saved
    handle.detach()
    tensors = {k: v.clone() for k, v in handle.state_dict().items()}
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("nan")
    broken = rewrite(path, tmp_path / "nan.safetensors", tensors=tensors)
    with pytest.raises(ValueError, match=rf"{broken}: 1 tensor\(s\) hold NaN/Inf values: {key} \(1 of"):
        load_tuners(unet, broken)
    assert not getattr(unet, "_restune_sets", {})
    with caplog.at_level("WARNING"):
        loaded = load_tuners(unet, broken, allow_nonfinite=True)
    assert key in caplog.text and torch.isnan(loaded.state_dict()[key]).any()


@pytest.mark.parametrize("tuners, says", [
    ('[{"type": "nope"}]', "unknown tuner 'nope'"),
    ('[{"type": "lora", "rnak": 2}]', "unknown field(s) ['rnak']"),
    ('[{"type": "lora", "rank": "two"}]', "rank must be a positive int"),
    ("[]", "expected at least one tuner"),
    ('{"type": "lora"}', "must be a JSON list"),
    ('"configs/x.yaml"', "must be a JSON list"),
    ("[{", "not valid JSON"),
    ('[{"type": "lora", "blocks": ["no_such_block"]}]', "no_such_block"),
    ('[{"type": "lora", "blocks": [99]}]', "positions must be ints"),
])
def test_every_config_error_names_the_file(saved, unet, tmp_path, tuners, says):
    handle, path = saved
    handle.detach()
    bad = rewrite(path, tmp_path / "bad.safetensors", tuners=tuners)
    with pytest.raises(ValueError) as err:
        load_tuners(unet, bad)
    assert str(err.value).startswith(f"{bad}: tuner config") and says in str(err.value)
    assert not getattr(unet, "_restune_sets", {})


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_normal_modes_honouring_umask(saved, tmp_path, umask, file_mode, dir_mode):
    handle, _ = saved
    old = os.umask(umask)
    try:
        path = save_tuners(tmp_path / "new" / "tuners.safetensors", handle)
        text = atomic_write_text(tmp_path / "new" / "log.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode and stat.S_IMODE(text.stat().st_mode) == file_mode
    assert stat.S_IMODE(path.parent.stat().st_mode) == dir_mode


def test_detaching_a_loaded_full_fine_tuning_file_puts_the_base_weights_back(unet, unet_inputs, tmp_path):
    """A full file overwrites the UNet's own weights: after detach the next set evaluated sits on the base (the
    evaluation runner loads rows one after another on one UNet)."""
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    base_out = run_unet(unet, unet_inputs)
    handle = attach(unet, {"type": "full"})
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.05)
    path = save_tuners(tmp_path / "full.safetensors", handle)
    handle.detach()
    with torch.no_grad():  # a fresh base, as the runner has
        for k, v in unet.state_dict().items():
            v.copy_(base_state[k])
    loaded = load_tuners(unet, path)
    assert not torch.allclose(run_unet(unet, unet_inputs), base_out)
    loaded.detach()
    assert all(torch.equal(v, base_state[k]) for k, v in unet.state_dict().items())
    torch.testing.assert_close(run_unet(unet, unet_inputs), base_out, rtol=0, atol=0)
