"""The tiny world's judges on their hard-negative set (issue 23): a judge is validated before it is believed.

    python bench/judge_tiny.py                  # 500 images per category -> bench/results/judge-tiny.md/.json
    python bench/judge_tiny.py --n 50 --out /tmp/j

Every image goes through the world's autoencoder first (what a generated image looks like). For each category:
the share given each shape class, the share judged correctly, and the share named one of the held-out concepts
(the error that would inflate a concept score). Targets: a clear concept counted right >= 0.95; blobs, empty and
noisy images, other polygons and the known shapes at any size named a concept <= 0.02 each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from restune_diffusion.files import atomic_write_text  # noqa: E402
from restune_diffusion.models import load_model  # noqa: E402
from restune_diffusion.world import judge as judges  # noqa: E402
from restune_diffusion.world.judge import AS_CONCEPT_TARGET, CLEAR_TARGET  # noqa: E402
from restune_diffusion.world.report import load_judges  # noqa: E402
from restune_diffusion.world.scene import CONCEPTS  # noqa: E402


def check(table: dict) -> dict[str, str]:
    """PASS/MISS per category against the targets."""
    out = {}
    for category, row in table.items():
        if category.startswith("clear ") and category.removeprefix("clear ") in CONCEPTS:
            out[category] = "PASS" if row["correct"] >= CLEAR_TARGET else "MISS"
        elif not category.startswith(("clear ", "styled ")):  # styled concepts: reported, no target
            out[category] = "PASS" if row["as_concept"] <= AS_CONCEPT_TARGET else "MISS"
    return out


def markdown(result: dict) -> str:
    classes = list(judges.SHAPE_CLASSES)
    lines = ["# The tiny world's judges on the hard-negative set (issue 23)", "",
             f"Command: `{result['command']}`. {result['n']} images per category, each through the world's "
             f"autoencoder. Targets: a clear concept counted right >= {CLEAR_TARGET}; every other category named a "
             f"held-out concept ({', '.join(CONCEPTS)}) <= {AS_CONCEPT_TARGET}.", ""]
    for name in ("judge", "check"):
        table, verdicts = result[name]["confusion"], result[name]["targets"]
        lines += [f"## {name}" + (" (the independent check)" if name == "check" else ""), "",
                  "| category | " + " | ".join(classes) + " | correct | named a concept | target |",
                  "|---|" + "---|" * (len(classes) + 3)]
        for category, row in table.items():
            lines.append(f"| {category} | " + " | ".join(f"{row[c]:.3f}" for c in classes) +
                         f" | {row['correct']:.3f} | {row['as_concept']:.3f} | {verdicts.get(category, '')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="images per category")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    start = time.time()
    vae = load_model("tiny").vae
    result = {"command": " ".join(["python bench/judge_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
              "n": args.n}
    for name, judge in zip(("judge", "check"), load_judges()):
        table = judges.confusion(judge, vae, args.n)
        result[name] = {"confusion": table, "targets": check(table)}
    result["seconds"] = round(time.time() - start, 1)
    out = Path(args.out)
    atomic_write_text(out / "judge-tiny.json", json.dumps(result, indent=1))
    text = markdown(result)
    atomic_write_text(out / "judge-tiny.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
