"""restune_diffusion/methods.py: the method list is derived once, from the paper's rows and the tuner registry."""

from restune_diffusion.methods import CONFIG_DIR, label, methods, paper_methods
from restune_diffusion.paper import PAPER


def test_the_methods_are_the_papers_rows_then_our_registered_tuners_with_a_config():
    assert paper_methods() == ("full", "lora", "adapter", "prefix", "prompt", "res_tuning", "res_tuning_bypass")
    assert methods() == (*paper_methods(), "sc_tuner", "dora", "loha", "lokr", "oft")
    assert all((CONFIG_DIR / f"{m}.yaml").is_file() for m in methods())
    assert set(paper_methods()) | {"base"} == set(PAPER)


def test_a_registered_tuner_with_a_config_of_its_name_becomes_a_method(tmp_path):
    (tmp_path / "res_prefix.yaml").write_text("tuners: [{type: res_prefix}]\n")  # registered, no shipped config
    (tmp_path / "not_a_tuner.yaml").write_text("tuners: [{type: lora}]\n")  # a config, but no registered type
    assert methods(tmp_path) == (*paper_methods(), "res_prefix")
    assert (label("res_tuning"), label("sc_tuner"), label("dora"), label("res_prefix")) == (
        "Res-Tuning", "SC-Tuner", "DoRA", "res_prefix")
