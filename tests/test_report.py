"""The parameter report: paper rows on the SD v1.5 UNet (meta device)."""

import json

import pytest

from restune_diffusion.report import main

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
# rows of the paper's SD v1.5 table: config -> (paper params, our exact count)
PAPER = {"lora": (9.96e6, 9_964_800), "adapter": (2.51e6, 2_510_080), "prefix": (4.99e6, 4_992_000),
         "prompt": (1.25e6, 1_248_000), "res_tuning": (2.54e6, 2_535_056), "full": (862e6, 859_520_964)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_reproduces_the_paper_parameter_count(name, capsys):
    main([str(ROOT / "configs" / f"{name}.yaml")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("trainable_params=")
    count = int(lines[-1].split("=")[1])
    paper, exact = PAPER[name]
    assert count == exact
    assert abs(count - paper) / paper < 0.01


def test_report_on_tiny_lists_types_and_blocks(capsys):
    main([str(ROOT / "configs" / "res_tuning.yaml"), "--model", "tiny"])
    out = capsys.readouterr().out
    assert "res_adapter" in out and "res_prompt" in out and "mid_block.attentions.0.transformer_blocks.0" in out


def trainable(capsys) -> int:
    return int(capsys.readouterr().out.strip().splitlines()[-1].split("=")[1])


def test_a_config_that_names_its_model_is_reported_on_that_model(capsys):
    # configs/tiny_demo.yaml names `tiny`, the shipped pretrained tiny base (64/128/128 wide): 93,383 parameters, the
    # count train_t2i.py prints for the demo; SD v1.5 would give 1,648,400
    main([str(ROOT / "configs" / "tiny_demo.yaml")])
    out = capsys.readouterr().out
    assert out.startswith("model: tiny (") and out.strip().endswith("trainable_params=93383")
    main([str(ROOT / "configs" / "tiny_demo.yaml"), "--model", "sd15"])  # --model overrides
    assert trainable(capsys) == 1_648_400
    main([str(ROOT / "configs" / "tiny_demo.yaml"), "--model", "tiny-random"])  # the test model: half as wide
    assert trainable(capsys) == 46_919


@pytest.mark.parametrize("config", ["tiny_demo.yaml", "tiny/res_tuning_bypass.yaml"])
def test_report_counts_what_a_training_run_on_the_shipped_tiny_base_trains(config, tmp_path, capsys):
    """The count the report prints for a config that names `tiny` is the one train_t2i.py's summary.json gives (the
    shipped pretrained base, not the test model's architecture)."""
    from accelerate.state import AcceleratorState, GradientState

    from restune_diffusion import train as T
    from restune_diffusion import world

    data = world.write_imagefolder(tmp_path / "data", world.examples("concept_train", 8))
    args = T.parse_args(["--config", str(ROOT / "configs" / config), "--data_dir", str(data),
                         "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--no-world_report",
                         "--train_batch_size", "2", "--num_validation_images", "0", "--checkpointing_steps", "0"])
    try:
        T.train(args)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    main([str(ROOT / "configs" / config)])
    assert trainable(capsys) == summary["trainable_params"]
    main([str(ROOT / "configs" / config), "--model", "tiny-random"])
    assert trainable(capsys) != summary["trainable_params"]  # the test model is another architecture
