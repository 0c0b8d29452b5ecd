"""The methods this project compares, derived in one place: the paper's tuned rows (paper.py) in the paper's order,
then every registered tuner type (tuners.REGISTRY) that ships a config of its own name (configs/<type>.yaml). A new
tuner = its file, its registry line and its config; the table, the benches and check_512 pick it up from here.
"""

from __future__ import annotations

from pathlib import Path

from restune_diffusion.paper import LABELS, PAPER
from restune_diffusion.tuners import REGISTRY

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/ (one YAML per method)
BASE = "base"  # the untuned model: a row of the paper's table, not a method to train
# methods beyond the paper's table: SCEdit's tuner (arXiv 2312.11392), the baselines built by peft (issue 27)
OTHER_LABELS = {"sc_tuner": "SC-Tuner", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT"}


def paper_methods() -> tuple[str, ...]:
    """The paper's tuned rows in its order: full, lora, adapter, prefix, prompt, res_tuning, res_tuning_bypass."""
    return tuple(m for m in PAPER if m != BASE)


def methods(config_dir: Path = CONFIG_DIR) -> tuple[str, ...]:
    """The paper's methods, then each registered tuner type with a config of its name in `config_dir` (sc_tuner, dora,
    loha, lokr, oft)."""
    paper = paper_methods()
    return paper + tuple(t for t in REGISTRY if t not in paper and (Path(config_dir) / f"{t}.yaml").is_file())


def config_path(method: str, config_dir: Path = CONFIG_DIR) -> Path:
    return Path(config_dir) / f"{method}.yaml"


def label(method: str) -> str:
    """The name a table shows: the paper's ("Res-Tuning"), else ours, else the method's own name."""
    return LABELS.get(method) or OTHER_LABELS.get(method, method)
