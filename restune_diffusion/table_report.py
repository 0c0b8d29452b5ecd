"""table.md and table.png of the paper's table (restune_diffusion/table.py runs it): the rows beside the paper's
numbers, each as a ratio to Full, the --column rows beside the row they repeat, and FID vs training memory."""

from __future__ import annotations

from pathlib import Path

from restune_diffusion.files import atomic_write
from restune_diffusion.paper import PAPER_SOURCE

METRICS = ("fid", "params_m", "memory_gb", "hours_per_epoch")  # the paper's columns, each also as a ratio to Full


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cell(value, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(table: dict) -> str:
    rows, ev, tr = table["rows"], table["eval"], table["train"]
    with_clip = any(r["clip_score"] is not None for r in rows)
    kind = next((r["memory_kind"] for r in rows if r.get("memory_kind")), "–")
    lines = [
        "# The paper's SD v1.5 table, reproduced", "",
        f"Ours: {tr['pretrained_model_name_or_path']}, data {tr['dataset']} ({tr['data_dir']}), {tr['steps']} steps "
        f"at batch {tr['train_batch_size']} x {tr['num_processes']} processes x {tr['gradient_accumulation_steps']} "
        f"accumulation, seed {tr['seed']}, mixed precision {tr['mixed_precision']}, {tr['resolution']} px. "
        f"FID on N = {ev['n']} COCO{ev['coco']['year']} {ev['coco']['split']} captions, guidance "
        f"{ev['guidance_scale']:g}, {ev['steps']} {ev['scheduler']} steps, seed {ev['seed']}.",
        f"Paper: {PAPER_SOURCE}.", "",
        "| Method | FID ↓ | paper FID |" + (" CLIP score ↑ |" if with_clip else "") + " Params (M) | % of UNet | "
        "paper params (M) | Memory (GB) | paper memory (GB) | Hours/epoch | paper hours/epoch |",
        "|---|---|---|" + ("---|" if with_clip else "") + "---|---|---|---|---|---|---|"]
    columns = [r for r in rows if r.get("column")]
    rows = [r for r in rows if not r.get("column")]
    for r in rows:
        p = r["paper"] or {}
        clip = f" {_cell(r['clip_score'])} |" if with_clip else ""
        lines.append(f"| {r['label']} | {r['fid']:.2f} | {_cell(p.get('fid'))} |{clip} {_cell(r['params_m'], '.4g')} | "
                     f"{_cell(r['params_percent'], '.3g')} | {_cell(p.get('params_m'), 'g')} | "
                     f"{_cell(r['memory_gb'], '.3g')} | {_cell(p.get('memory_gb'))} | "
                     f"{_cell(r['hours_per_epoch'], '.3g')} | {_cell(p.get('hours_per_epoch'))} |")
    lines += ["", "Each as a ratio to Full (ours, paper):", "",
              "| Method | FID | paper | Params | paper | Memory | paper | Hours/epoch | paper |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, paper = r["vs_full"], (r["paper"] or {}).get("vs_full") or {}
        lines.append(f"| {r['label']} | " + " | ".join(f"{_cell(ours[m], '.3g')} | {_cell(paper.get(m), '.3g')}"
                                                         for m in METRICS) + " |")
    if columns:
        names = list(dict.fromkeys(r["column"] for r in columns))
        by = {(r["of"], r["column"]): r for r in columns}
        lines += ["", "With each --column's flags (" + "; ".join(f"{n}: `{table.get('columns', {}).get(n, '')}`"
                                                            for n in names) + "), beside the row as trained:", "",
                  "| Method | FID | " + " | ".join(f"FID {n} | Δ FID {n} | Memory {n} ÷ row's | Hours/epoch {n} ÷ "
                                                    f"row's" for n in names) + " |",
                  "|---|---|" + "---|---|---|---|" * len(names)]
        for r in rows:
            if not any((r["row"], n) in by for n in names):
                continue
            cells = []
            for n in names:
                c = by.get((r["row"], n))
                cells += ([_cell(c["fid"]), _cell(c["fid"] - r["fid"], "+.2f"),
                           _cell(ratio(c["memory_gb"], r["memory_gb"]), ".3g"),
                           _cell(ratio(c["hours_per_epoch"], r["hours_per_epoch"]), ".3g")] if c else ["–"] * 4)
            lines.append(f"| {r['label']} | {r['fid']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Columns: FID (and CLIP score) from one evaluation of every row (eval/eval.json); params = "
              "trainable tensors of the row's tuners, % of the UNet's parameters; memory = peak during the row's "
              f"training ({kind}), hours/epoch = seconds per step of the row's training x steps per epoch "
              "(training data / batch / processes / accumulation), both from <row>/summary.json. The paper's memory "
              "and time were measured on its GPUs at 512 px and COCO2017's 118k images: compare the ratios."]
    untimed = [r["label"] for r in rows if r.get("steps_run") == 0]
    if untimed:
        lines.append(f"- No time for {', '.join(untimed)}: its last session resumed at the final step and ran none; "
                     "delete the row's folder and rerun to time it.")
    if not table["memory_reset"]:
        lines.append("- The peak memory could not be reset between rows here (not Linux): each row's peak includes "
                     "the rows trained before it in the same process.")
    lines += [f"- {w}" for w in ev["warnings"]]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> Path:
    """FID vs training memory, one point per method: ours (left) and the paper's (right); the base as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, title, get in ((axes[0], "ours", lambda r: r), (axes[1], "paper", lambda r: r["paper"])):
        for i, r in enumerate(table["rows"]):
            values = get(r)
            if not values or values["fid"] is None:
                continue
            color = colors[i % len(colors)]
            if values["memory_gb"] is None:  # the base: no training
                ax.axhline(values["fid"], color=color, linestyle="--", label=f"{r['label']} (no training)")
                continue
            ax.scatter([values["memory_gb"]], [values["fid"]], color=color, label=r["label"])
            ax.annotate(r["label"], (values["memory_gb"], values["fid"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("peak training memory (GB)")
        ax.set_ylabel("FID")
        ax.set_title(title if title == "paper" else f"ours (N={table['eval']['n']})")
    axes[0].legend(fontsize=7)
    fig.suptitle("FID vs training memory")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
