"""The tiny world: a synthetic captioned domain in which generation quality is real and measurable on a CPU (issue 14).

Images are one shape on a plain background, 32 x 32, captioned "a red circle on a white background". The tiny base
(`--pretrained_model_name_or_path tiny`, made by tools/pretrain_tiny.py) is pretrained on circles, squares and
triangles; the held-out concept, the star, is never in its pretraining data (the autoencoder and the classifier do
see stars: they are the world's camera and judge, not the generator). A small attribute classifier, trained by the
same script and shipped beside the base, gives prompt accuracy (the fraction of generated images whose shape, colour
and background are the ones asked for) and, through its penultimate features, a domain FID computed by the same
torchmetrics path as the Inception FID (`evaluation.metrics.fid_metric`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from . import sampling
from .evaluation.metrics import fid_metric, fid_value
from .files import atomic_write, atomic_write_text
from .models import TINY, TINY_ASSETS, TINY_PRETRAIN_COMMAND, build_pipeline, load_model
from .sampling import PROTOCOL_STRIDE, SamplingSettings, make_grid
from .weights import load_tuners

RESOLUTION = 32
PRETRAIN_SHAPES = ("circle", "square", "triangle")
CONCEPT = "star"  # the held-out shape kind: never in the base's pretraining data
SHAPES = PRETRAIN_SHAPES + (CONCEPT,)  # the classifier's shape classes
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, so star points survive at 32 px

# seeds of the world's splits: pretraining data, the concept's training set, its held-out set, evaluation noise
SPLIT_SEEDS = {"pretrain": 0, "concept_train": 1, "concept_heldout": 2, "classifier": 3}

ASSETS = TINY_ASSETS  # the pretrained base's folder; the classifier is its classifier/ sub-folder
PRETRAIN_COMMAND = TINY_PRETRAIN_COMMAND
# how generated images are scored: the same prompts, seeds and sampler for every model compared
SAMPLING_STEPS, GUIDANCE_SCALE, EVAL_REPEATS = 20, 4.0, 8  # concept: 12 colour x background prompts x 8 = 96 images


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str
    size: int = 20  # side of the shape's box in pixels at RESOLUTION
    x: int = 6  # top-left corner of the box
    y: int = 6

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def sample_attributes(rng: np.random.Generator, shapes: tuple[str, ...] = PRETRAIN_SHAPES,
                      resolution: int = RESOLUTION) -> Attributes:
    """Random shape, colour, background, size (45-75 % of the side) and position (the whole shape inside)."""
    size = int(rng.integers(int(0.45 * resolution), int(0.75 * resolution) + 1))
    x, y = (int(v) for v in rng.integers(1, resolution - size, size=2))
    return Attributes(str(rng.choice(shapes)), str(rng.choice(list(COLOURS))), str(rng.choice(list(BACKGROUNDS))),
                      size, x, y)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, ...], colour: tuple) -> None:
    """One filled shape in `box` (x0, y0, x1, y1). The world's own drawer (the demo's is private to data/)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "star":  # 5 points, outer and inner radius alternating
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], fill=colour)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def render(attrs: Attributes, resolution: int = RESOLUTION) -> Image.Image:
    """The image of `attrs`: a deterministic function of its fields."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (resolution * s, resolution * s), BACKGROUNDS[attrs.background])
    box = (attrs.x * s, attrs.y * s, (attrs.x + attrs.size) * s, (attrs.y + attrs.size) * s)
    draw_shape(ImageDraw.Draw(image), attrs.shape, box, COLOURS[attrs.colour])
    return image.resize((resolution, resolution), Image.BOX)


def examples(split: str, n: int, shapes: tuple[str, ...] | None = None) -> list[Attributes]:
    """The first n attributes of a split (deterministic; a longer list starts with the shorter one)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {list(SPLIT_SEEDS)}, got {split!r}")
    if shapes is None:
        shapes = (CONCEPT,) if split.startswith("concept") else SHAPES if split == "classifier" else PRETRAIN_SHAPES
    return [sample_attributes(np.random.default_rng([SPLIT_SEEDS[split], i]), shapes) for i in range(n)]


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def render_batch(attrs: list[Attributes]) -> torch.Tensor:
    return to_uint8([render(a) for a in attrs])  # (N, 3, 32, 32) uint8


def labels(attrs: list[Attributes]) -> dict[str, torch.Tensor]:
    """Class indices per head, (N,) each."""
    return {head: torch.tensor([names.index(getattr(a, head)) for a in attrs]) for head, names in HEADS.items()}


def prompt_grid(shapes: tuple[str, ...], repeats: int = 1) -> list[Attributes]:
    """Every colour x background for each shape, `repeats` times (evaluation prompts; layout is the model's)."""
    combos = [Attributes(s, c, b) for s in shapes for c in COLOURS for b in BACKGROUNDS]
    return combos * repeats


# ---------------------------------------------------------------------------------------------------------------------
# the concept dataset, in the folder formats users have
def write_imagefolder(out: str | os.PathLike, attrs: list[Attributes]) -> Path:
    """`out/00000.png ...` + `metadata.jsonl` ({"file_name", "text"}), the diffusers imagefolder layout."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, a in enumerate(attrs):
        atomic_write(root / f"{i:05d}.png", lambda tmp, a=a: render(a).save(tmp, format="PNG"))
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": a.caption}))
    atomic_write_text(root / "metadata.jsonl", "\n".join(lines) + "\n")
    return root


def write_class_folders(out: str | os.PathLike, attrs: list[Attributes]) -> Path:
    """`out/<colour> <shape>/00000.png`: the fine-grained class-folder layout (captions come from the template)."""
    root = Path(out)
    for i, a in enumerate(attrs):
        folder = root / f"{a.colour} {a.shape}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{i:05d}.png", lambda tmp, a=a: render(a).save(tmp, format="PNG"))
    return root


def write_coco_layout(out: str | os.PathLike, attrs: list[Attributes], split: str = "train") -> Path:
    """`out/{split}2017/*.jpg`... as PNG files named like COCO's, with `annotations/captions_{split}2017.json`."""
    root = Path(out)
    images_dir = root / f"{split}2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, a in enumerate(attrs):
        name = f"{i + 1:012d}.png"
        atomic_write(images_dir / name, lambda tmp, a=a: render(a).save(tmp, format="PNG"))
        images.append({"id": i + 1, "file_name": name, "width": RESOLUTION, "height": RESOLUTION})
        annotations.append({"id": i + 1, "image_id": i + 1, "caption": a.caption})
    (root / "annotations").mkdir(exist_ok=True)
    atomic_write_text(root / "annotations" / f"captions_{split}2017.json",
                      json.dumps({"images": images, "annotations": annotations}))
    return root


CONCEPT_TRAIN_N = 64  # the concept's training set: what a user would bring for a new concept


def use_concept_data(args) -> None:
    """For `world_report: true`: the held-out concept's training set is the run's data set. Writes it as an
    imagefolder to `--data_dir` (default <output_dir>/concept_data) unless a metadata.jsonl is already there."""
    if args.dataset != "imagefolder":
        raise ValueError(f"world_report: the concept is written as an imagefolder; expected dataset: imagefolder, "
                         f"got {args.dataset!r}")
    args.data_dir = args.data_dir or os.path.join(args.output_dir, "concept_data")
    if not (Path(args.data_dir) / "metadata.jsonl").is_file():
        write_imagefolder(args.data_dir, examples("concept_train", CONCEPT_TRAIN_N))


def write_concept_datasets(out: str | os.PathLike, n_train: int = 64, n_heldout: int = 64) -> dict[str, Path]:
    """The held-out concept's train and held-out sets in all three layouts under `out`."""
    root = Path(out)
    paths = {}
    for split, n in (("concept_train", n_train), ("concept_heldout", n_heldout)):
        attrs = examples(split, n)
        name = split.removeprefix("concept_")
        paths[f"{name}_imagefolder"] = write_imagefolder(root / name / "imagefolder", attrs)
        paths[f"{name}_classes"] = write_class_folders(root / name / "classes", attrs)
        paths[f"{name}_coco"] = write_coco_layout(root / name / "coco", attrs, split="train" if name == "train"
                                                  else "val")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# the attribute classifier: prompt accuracy and domain-FID features
class AttributeClassifier(nn.Module):
    """A 3-conv CNN on 32 x 32 images with one head per attribute; `features` is the penultimate layer (B, width)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.width = width
        c = width // 2
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU(),  # (B, c, 16, 16)
            nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU(),  # (B, w, 8, 8)
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU(),  # (B, w, 4, 4)
            nn.Flatten(), nn.Linear(width * 16, width), nn.ReLU(),  # (B, w)
        )
        self.heads = nn.ModuleDict({head: nn.Linear(width, len(names)) for head, names in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, width); other sizes are resized to 32 x 32."""
        x = images.float() / 127.5 - 1
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = nn.functional.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        return self.body(x)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {head: layer(h) for head, layer in self.heads.items()}  # (B, classes) each


class DomainFeatures(nn.Module):
    """The classifier's penultimate layer as torchmetrics' FID `feature` network: uint8 (B, 3, H, W) -> (B, D)."""

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.width  # read by torchmetrics instead of probing with a dummy image

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


CLASSIFIER_FILE = "model.safetensors"


def save_classifier(classifier: AttributeClassifier, folder: str | os.PathLike, fp16: bool = True) -> Path:
    from safetensors.torch import save_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v.detach().to(dtype).contiguous() for k, v in classifier.state_dict().items()}
    meta = {"width": str(classifier.width), "heads": json.dumps(HEADS)}
    atomic_write(root / CLASSIFIER_FILE, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return root


def load_classifier(folder: str | os.PathLike = ASSETS / "classifier") -> AttributeClassifier:
    """The shipped attribute classifier (fp32); a named error when it is missing or made for other attributes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no attribute classifier. Make the tiny world with `{PRETRAIN_COMMAND}`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("heads", "null")) != json.loads(json.dumps(HEADS)):
        raise ValueError(f"{path}: expected a classifier of heads {HEADS}, got {meta.get('heads')}")
    classifier = AttributeClassifier(int(meta["width"]))
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return classifier.eval()


@torch.no_grad()
def predict(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """uint8 (N, 3, H, W) -> predicted class index per head, (N,) each."""
    out: dict[str, list] = {head: [] for head in HEADS}
    for lo in range(0, len(images), batch_size):
        for head, logits in classifier(images[lo:lo + batch_size]).items():
            out[head].append(logits.argmax(-1))
    return {head: torch.cat(v) for head, v in out.items()}


def prompt_accuracy(classifier: AttributeClassifier, images: torch.Tensor, asked: list[Attributes]) -> dict:
    """Fraction of images whose shape / colour / background is the one asked for, and all three at once ('all')."""
    if len(images) != len(asked):
        raise ValueError(f"prompt_accuracy: expected one image per prompt, got {len(images)} images for "
                         f"{len(asked)} prompts")
    pred, want = predict(classifier, images), labels(asked)
    hits = {head: pred[head] == want[head] for head in HEADS}
    result = {head: float(h.float().mean()) for head, h in hits.items()}
    result["all"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return result


def domain_fid(classifier: AttributeClassifier, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID of uint8 image sets (N, 3, H, W) in the classifier's feature space, through torchmetrics' FID."""
    metric = fid_metric(DomainFeatures(classifier))
    for images, is_real in ((real, True), (fake, False)):
        for lo in range(0, len(images), batch_size):
            metric.update(images[lo:lo + batch_size], real=is_real)
    return fid_value(metric)


# ---------------------------------------------------------------------------------------------------------------------
# generation
@torch.no_grad()
def generate(sd, prompts: list[str], seed: int = 0, steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE_SCALE,
             batch_size: int = 64) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) images, image i from the seed of image i (sampling.py, the protocols' stride; any batch)."""
    settings = SamplingSettings(steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                seed_stride=PROTOCOL_STRIDE)
    return to_uint8(sampling.generate(build_pipeline(sd), prompts, settings, height=RESOLUTION, width=RESOLUTION)[0])


def model_index() -> dict:
    """diffusers' model_index.json for the tiny base, so StableDiffusionPipeline.from_pretrained reads the folder."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


# ---------------------------------------------------------------------------------------------------------------------
# scoring a model, and the default job's before/after report
def concept_eval_set(repeats: int = EVAL_REPEATS) -> tuple[list[Attributes], torch.Tensor]:
    """The held-out concept's prompts (every colour x background, `repeats` times) and as many real held-out images."""
    asked = prompt_grid((CONCEPT,), repeats)
    return asked, render_batch(examples("concept_heldout", len(asked)))


def score(sd, classifier: AttributeClassifier, seed: int = 0, repeats: int = EVAL_REPEATS) -> tuple[dict, torch.Tensor]:
    """Prompt accuracy and domain FID on the held-out concept, and prompt accuracy on the pretraining prompts (what
    tuning may forget). Returns (metrics, the concept images (N, 3, 32, 32) uint8)."""
    asked, real = concept_eval_set(repeats)
    kw = dict(seed=seed, steps=SAMPLING_STEPS, guidance_scale=GUIDANCE_SCALE)
    images = generate(sd, [a.caption for a in asked], **kw)
    pretrain = prompt_grid(PRETRAIN_SHAPES)
    pretrain_images = generate(sd, [a.caption for a in pretrain], **kw)
    metrics = {"concept_accuracy": prompt_accuracy(classifier, images, asked),
               "concept_domain_fid": domain_fid(classifier, real, images),
               "pretrain_accuracy": prompt_accuracy(classifier, pretrain_images, pretrain), "n": len(asked),
               "seed": seed, "steps": SAMPLING_STEPS, "guidance_scale": GUIDANCE_SCALE}
    return metrics, images


def upscaled_grid(rows: list[torch.Tensor], scale: int = 2) -> Image.Image:
    """uint8 image rows (each (N, 3, H, W)) as one picture, every image enlarged `scale` x with nearest pixels."""
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()).resize((im.shape[-1] * scale,) * 2, Image.NEAREST)
              for row in rows for im in row]
    return make_grid(images, cols=len(rows[0]))


def before_after_report(output_dir: str | os.PathLike, tuners_path: str | os.PathLike, base: str = TINY,
                        seed: int = 0) -> dict:
    """Base vs tuned on the held-out concept, same prompts and seeds: `before_after.png` (top row base, bottom row
    tuned, one image per colour x background) and `world_report.json` in output_dir; prints the numbers."""
    out = Path(output_dir)
    sd, classifier = load_model(base), load_classifier()
    before, before_images = score(sd, classifier, seed)
    load_tuners(sd.unet, tuners_path)
    after, after_images = score(sd, classifier, seed)
    n = len(prompt_grid((CONCEPT,)))
    grid = upscaled_grid([before_images[:n], after_images[:n]])
    atomic_write(out / "before_after.png", lambda tmp: grid.save(tmp, format="PNG"))
    report = {"base": base, "tuners": str(tuners_path), "concept": CONCEPT, "before": before, "after": after,
              "grid": "before_after.png: top row the base, bottom row tuned; prompts " +
                      "; ".join(a.caption for a in prompt_grid((CONCEPT,)))}
    atomic_write_text(out / "world_report.json", json.dumps(report, indent=1))
    print(report_text(report))
    return report


def report_text(report: dict) -> str:
    rows = [f"held-out concept '{report['concept']}' ({report['before']['n']} images, same prompts and seeds):",
            f"{'':8}{'prompt accuracy':>17}{'shape':>8}{'domain FID':>12}{'pretraining prompts':>21}"]
    for name in ("before", "after"):
        m = report[name]
        rows.append(f"{name:8}{m['concept_accuracy']['all']:>17.3f}{m['concept_accuracy']['shape']:>8.3f}"
                    f"{m['concept_domain_fid']:>12.2f}{m['pretrain_accuracy']['all']:>21.3f}")
    return "\n".join(rows)
