"""The README's quality numbers are the bench files' numbers (issues 23, 25): a rerun that changes a result file
fails here until the README says the same."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "bench" / "results"


def test_the_readme_miniature_table_is_the_one_in_quality_tiny_json():
    from bench import quality_tiny

    path, partial = RESULTS / "quality-tiny.json", RESULTS / "quality-tiny-partial.json"
    if path.is_file():
        table = quality_tiny.headline_markdown(json.loads(path.read_text()))
        assert table in README, "README: the miniature table differs from headline_markdown(quality-tiny.json)"
    elif partial.is_file():  # part measured: README shows that part's table and says which part it is
        table = json.loads(partial.read_text())
        assert quality_tiny.headline_markdown(table) in README, \
            "README: the miniature table differs from headline_markdown(quality-tiny-partial.json)"
        meta = table["meta"]
        assert f"measured so far: {', '.join(meta['concepts'])} of the {len(meta['all_concepts'])} concepts" in README
    else:  # not measured yet: the README must say so and show no table of that shape
        assert "It has not been run on this world yet" in README
        assert "| method | LR | params | concept drawn ↑ |" not in README


def _forgetting_rows() -> dict[str, list[str]]:
    """README's default-job forgetting table: setting -> its three cells."""
    start = README.index("| setting | star drawn (ceiling")
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_readme_forgetting_table_is_the_one_in_forgetting_tiny_json():
    result = json.loads((RESULTS / "forgetting-tiny.json").read_text())
    job = result["methods"]["tiny_demo"]
    ceiling = result["ceilings"]["star"]
    assert f"| setting | star drawn (ceiling {ceiling:.3f}) |" in README
    rows = _forgetting_rows()
    names = {"none": "no remedy", "prior": "prior preservation, weight {w:g}",
             "prediction": "base-prediction preservation, weight {w:g}"}
    cell = lambda d: f"{d['mean']:.3f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"  # noqa: E731
    trained = [p for p in job["points"] if p["remedy"] != "scale"]
    for p in trained:
        name = names[p["remedy"]].format(w=p["weight"])
        assert name in rows, f"README forgetting table: no row {name!r}"
        assert rows[name] == [cell(p["concept_drawn"]), cell(p["kept"]), cell(p["heldout_combos"])], name
    scales = [p for p in job["points"] if p["remedy"] == "scale"]
    name = "inference weight " + " / ".join(f"{p['weight']:g}" for p in scales)
    assert rows[name] == [" / ".join(f"{p[k]['mean']:.3f}" for p in scales)
                          for k in ("concept_drawn", "kept", "heldout_combos")]
    assert len(rows) == len(trained) + 1, "README forgetting table: a row the JSON does not have"


def test_the_default_job_paragraph_quotes_the_forgetting_table():
    """The tiny-world section repeats the table's numbers in prose (after "Unremedied"); each must be in the table,
    and the ceiling it quotes must be the JSON's."""
    prose = README[README.index("The default job (`python train_t2i.py`) fine-tunes"):]
    prose = prose[prose.index("Unremedied"):prose.index("**The paper's table in miniature**")]
    quoted = re.findall(r"0\.\d{3}(?: \[0\.\d\d, 0\.\d\d\])?", prose)
    ceiling = json.loads((RESULTS / "forgetting-tiny.json").read_text())["ceilings"]["star"]
    assert f"(ceiling {ceiling:.3f})" in prose
    table = "\n".join(" | ".join(v) for v in _forgetting_rows().values())
    missing = [q for q in quoted if q != f"{ceiling:.3f}" and q not in table]
    assert len(quoted) >= 4 and not missing, f"README prose quotes {missing}, the forgetting table does not"


def test_the_tiny_world_tables_print_kid_in_the_judges_units():
    """KID was printed x10^3 as for Inception features; in the judge's features that gave values in the millions.
    eval.md prints the row's KID as computed."""
    from restune_diffusion.world.evaluation import markdown_table

    acc = {"all": 0.5, "shape": 0.5, "colour": 1.0, "background": 1.0}
    result = {"concept": "star", "n": 4, "seed": 0, "steps": 2, "scheduler": "DDIM", "resolution": 32, "n_pretrain": 2,
              "warnings": [], "protocol": "p",
              "rows": [{"model": "base", "step": None, "guidance_scale": 4.0, "concept_accuracy": acc,
                        "domain_fid": 12.0, "domain_kid_mean": 3.25, "pretrain_accuracy": {"all": 1.0}}]}
    text = markdown_table(result)
    assert "| domain KID ↓ |" in text and "| 12.00 | 3.25 | 1.000 |" in text and "3250" not in text


def test_the_quality_tables_protocol_states_the_sweeps_own_number_of_validation_images():
    """The table's protocol said 264 images per LR point while the sweep judged 528 (it counted one run's images)."""
    sweep = json.loads((RESULTS / "quality-tiny-sweep.json").read_text())
    (n,) = {s["n"] for m in sweep["methods"].values() for s in m["scores"].values()}
    for name in ("quality-tiny.json", "quality-tiny-partial.json"):
        if (RESULTS / name).is_file():
            assert f"{n} images per LR point" in json.loads((RESULTS / name).read_text())["meta"]["protocol"], name


def test_the_readme_remedy_table_is_the_one_in_forgetting_tiny_json():
    """'Which remedy for which tuner': the README's table is remedy_table(forgetting-tiny.json), every method in it."""
    from bench import forgetting_tiny

    result = json.loads((RESULTS / "forgetting-tiny.json").read_text())
    assert forgetting_tiny.remedy_table(result) in README, \
        "README: the remedy table differs from remedy_table(forgetting-tiny.json)"


def test_the_readme_joint_table_is_the_one_in_joint_tiny_json():
    import numpy as np

    from bench import joint_tiny

    result = json.loads((RESULTS / "joint-tiny.json").read_text())
    assert joint_tiny.headline(result) in README, "README: the joint table differs from headline(joint-tiny.json)"
    gaps = [g for g in result["weight_gaps"].values() if g is not None]
    cpu = result["train_cpu_seconds"]
    assert f"median {np.median(gaps):.1e}, at most {max(gaps):.1e}" in README
    assert f"{cpu['joint']:.0f} s for the four bypasses, the four alone runs {cpu['alone']:.0f} s together" in README
    if any(result["stats"][k]["verdicts_differ"] for k in result["stats"]):
        assert "no image's verdict changes" not in README
