"""Training outputs (issue 17, "Outputs"): the model card README.md and the run facts in the tuner file's header agree
with summary.json; the card's three lines load the result; joint runs get one card per task; the diffusers-format
LoRA file a training run exports loads with diffusers' load_lora_weights and gives our tuned UNet's output."""

import json
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from test_train import SMALL, cli_args, data_dir, fresh_accelerate_state  # noqa: F401 (fixtures)

from conftest import run_unet
from restune_diffusion import train as T
from restune_diffusion.ema import EMA_FILE
from restune_diffusion.models import build_pipeline, build_tiny_sd
from restune_diffusion.train import outputs as O
from restune_diffusion.weights import load_tuners, read_tuner_header


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir):  # noqa: F811
    """One optimizer step of a LoRA run with validation, EMA and a held-out split."""
    tmp = tmp_path_factory.mktemp("lora")
    argv = cli_args(tmp, data_dir, "--max_train_steps", "1", "--checkpointing_steps", "0", "--learning_rate", "5e-2",
                    "--lr_scheduler", "constant", "--validation_prompt", "a red circle", "--num_validation_images",
                    "1", "--use_ema", "--validation_split", "0.25", tuners=[SMALL["lora"]])
    summary = T.train(T.parse_args(argv))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return tmp / "out", summary


def test_the_card_states_the_facts_of_summary_json(lora_run):
    out, summary = lora_run
    card = (out / "README.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == summary
    facts = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", card, flags=re.M))
    base = summary["base_model"]
    assert facts["base model"] == f"tiny-random, fingerprint {base['fingerprint']}" and len(base["fingerprint"]) == 16
    assert facts["tuners"] == "lora (rank 2, targets [attn1, attn2], modules [to_q, to_k, to_v, to_out.0], blocks all)"
    assert facts["trainable parameters"].startswith(f"{summary['trainable_params']:,} (")
    data = summary["data"]
    assert (data["num_train_samples"], data["num_heldout_samples"]) == (12, 4)
    assert facts["data"].startswith(f"imagefolder in {data['data_dir']}: 12 training samples + 4 held out")
    assert facts["steps"].startswith("1 (batch 2 = 2 per device x 1 processes x 1 accumulation)")
    assert facts["peak memory"] == f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']})"
    assert facts["training time"].startswith(f"{summary['train_seconds']:.1f} s for 1 steps")
    assert facts["final loss"] == f"{summary['final_loss']:.4f} (training), {summary['final_val_loss']:.4f} (held out)"
    assert "![samples](samples.png)" in card and "![loss curve](loss.png)" in card
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "tiny-random" and "lora" in header["tags"]


def test_the_tuner_file_header_holds_base_steps_and_data(lora_run):
    out, summary = lora_run
    for name in (T.TUNERS_FILE, EMA_FILE):
        _, meta = read_tuner_header(out / name)
        assert meta["base_model"] == "tiny-random" and meta["base_model_fingerprint"] == \
            summary["base_model"]["fingerprint"]
        assert meta["global_step"] == str(summary["global_step"]) == "1"
        assert (meta["dataset"], meta["data_dir"]) == ("imagefolder", summary["data"]["data_dir"])
        assert meta["num_train_samples"] == "12" and meta["data_fingerprint"] == summary["data"]["fingerprint"]
        assert "base_model_revision" not in meta  # unset facts are left out, not written as "None"


def test_the_cards_three_lines_load_the_result(lora_run, monkeypatch):
    out, _ = lora_run
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.S).group(1)
    assert len(code.strip().splitlines()) == 3
    import restune_diffusion.generate as G

    calls = []
    load = G.load_pipeline

    def spy(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        calls.append(pipe)
        return pipe

    monkeypatch.setattr(G, "load_pipeline", spy)
    monkeypatch.chdir(out)
    exec(code, {})
    assert (out / "image.png").is_file() and list(calls[0].tuner_handles) == ["default"]


def test_a_joint_run_writes_one_card_per_task(tmp_path, data_dir):  # noqa: F811
    configs = []
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"tuners": [{"type": "bypass"}]}))
        configs += ["--config", str(tmp_path / f"{name}.yaml")]
    summaries = T.train(T.parse_args(configs + cli_args(tmp_path, data_dir, "--max_train_steps", "1",
                                                            "--checkpointing_steps", "0")[2:]))
    for name in ("one", "two"):
        card = (tmp_path / "out" / name / "README.md").read_text()
        assert card.splitlines()[6].startswith(f"# {name}: bypass tuners on tiny-random")
        _, meta = read_tuner_header(tmp_path / "out" / name / T.TUNERS_FILE)
        assert meta["global_step"] == "1" and summaries[name]["name"] == name
        assert not (tmp_path / "out" / "README.md").exists()


def test_the_diffusers_lora_file_of_a_training_run_loads_with_load_lora_weights(lora_run, unet_inputs):
    pytest.importorskip("peft")
    out, _ = lora_run
    ours_sd = build_tiny_sd()  # tiny-random: the run's base, seed 0
    base = run_unet(ours_sd.unet, unet_inputs)
    handle = load_tuners(ours_sd.unet, out / T.TUNERS_FILE)
    ours = run_unet(ours_sd.unet, unet_inputs)
    pipe = build_pipeline(build_tiny_sd())
    pipe.load_lora_weights(str(out))  # the folder, as a diffusers user would: pytorch_lora_weights.safetensors
    theirs = run_unet(pipe.unet, unet_inputs)
    assert handle.num_parameters() and (ours - base).abs().max() > 1e-4  # one step changed the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_lora_run_also_writes_the_kohya_file_a1111_loads(lora_run, unet_inputs):
    pytest.importorskip("peft")
    out, summary = lora_run
    kohya = out / O.KOHYA_LORA_FILE
    assert summary["files"]["lora_kohya"] == str(kohya)
    _, meta = read_tuner_header(out / T.TUNERS_FILE)
    with safe_open(str(kohya), "pt") as f:
        keys, kmeta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and kmeta["ss_sd_model_name"] == "tiny-random"
    ours_sd = build_tiny_sd()
    load_tuners(ours_sd.unet, out / T.TUNERS_FILE)
    ours = run_unet(ours_sd.unet, unet_inputs)
    pipe = build_pipeline(build_tiny_sd())
    pipe.load_lora_weights(str(out), weight_name=kohya.name)  # diffusers reads kohya files as A1111 users share them
    torch.testing.assert_close(run_unet(pipe.unet, unet_inputs), ours, rtol=0, atol=1e-5)
