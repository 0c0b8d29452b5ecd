"""The tiny world's scenes: one shape on a plain background, 32 x 32, with a caption that names it (issue 23).

What the base UNet is pretrained on: PRETRAIN_SHAPES in every colour x background except HELDOUT_COMBOS, captions in
several phrasings. What it never sees: the CONCEPTS (the fine-tuning tasks, like the paper's fine-grained sets) and
the held-out combinations (measured to tell prompt following from a lookup of memorised captions). The autoencoder,
the world's camera, sees every shape (SD's autoencoder is general too); the judges see every shape and the
hard negatives (OTHER_SHAPES, blobs, partial, tiny, empty and noisy images) as an explicit "none" class.

Every image is a deterministic function of its Attributes; every split is a deterministic function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

RESOLUTION = 32
PRETRAIN_SHAPES = ("circle", "square", "triangle")
CONCEPTS = ("star", "heart", "cross", "crescent")  # never in the UNet's pretraining data
SHAPES = PRETRAIN_SHAPES + CONCEPTS  # the judges' named shape classes
NONE = "none"  # the judges' reject class: anything that is not one clear shape of SHAPES
OTHER_SHAPES = ("pentagon", "hexagon", "star4", "star6", "ellipse", "rectangle", "ring", "semicircle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
# colour x background x shape triples the UNet never sees in pretraining: each colour, background and shape still
# appears in other triples, so drawing these needs composition, not a memorised caption
HELDOUT_COMBOS = (("circle", "red", "black"), ("square", "green", "gray"), ("triangle", "blue", "white"),
                  ("circle", "yellow", "gray"), ("square", "blue", "black"), ("triangle", "red", "gray"))
TEMPLATES = ("a {colour} {shape} on a {background} background", "a {colour} {shape} on {background}",
             "{colour} {shape}, {background} background", "a {background} background with a {colour} {shape}",
             "a {shape}, {colour}, on a {background} background")
FILLERS = ("photo", "picture", "image", "simple", "small", "big", "plain", "bright", "dark", "centered")
WORDS = (*SHAPES, *COLOURS, *BACKGROUNDS, *FILLERS, "a", "on", "background", "with")  # one token each

SIZE_RANGE = (0.45, 0.75)  # side of a shape's box as a fraction of the image side
ROTATION = 15.0  # degrees either way
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, so star points survive at 32 px
SPLIT_SEEDS = {"pretrain": 0, "concept_train": 1, "concept_heldout": 2, "judge": 3, "judge_check": 4,
               "hard_negatives": 5, "reference": 6, "autoencoder": 7, "judge_validation": 8}


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str
    size: float = 0.6  # box side / image side
    cx: float = 0.5  # box centre, fractions of the image side
    cy: float = 0.5
    angle: float = 0.0  # degrees, counter-clockwise
    template: int = 0  # caption phrasing (index into TEMPLATES)

    @property
    def caption(self) -> str:
        return TEMPLATES[self.template].format(colour=self.colour, shape=self.shape, background=self.background)


def canonical(shape: str, colour: str, background: str) -> Attributes:
    """The evaluation form of a prompt: centred, upright, mid-sized, the first phrasing (the model picks the layout)."""
    return Attributes(shape, colour, background)


# ---------------------------------------------------------------------------------------------------------------------
# shapes as polygons in unit coordinates (the box is [-1, 1]^2, y up)
def _regular(n: int, phase: float = np.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def star_polygon(points: int, inner: float) -> np.ndarray:
    a = np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    xy = np.stack([x, y], 1)
    xy -= (xy.max(0) + xy.min(0)) / 2
    return xy / np.abs(xy).max()


def crescent_polygon(inner: float = 0.8, offset: float = 0.5,
                     meet: tuple[float, float] | None = (0.61, 0.79)) -> np.ndarray:
    """A unit disc minus a disc of radius `inner` centred at (offset, 0): the outer arc through the left, then the
    inner arc back. `meet`: where the two circles meet, x = (1 + d² - r²) / 2d (None: computed; the world's own
    crescent keeps the rounded point it was made with)."""
    meet_x, meet_y = meet or ((1 + offset**2 - inner**2) / (2 * offset),) * 2
    if meet is None:
        meet_y = np.sqrt(1 - meet_x**2)
    top = np.arccos(meet_x)
    t = np.linspace(top, 2 * np.pi - top, 48)
    outer = np.stack([np.cos(t), np.sin(t)], 1)
    inner_top = np.arctan2(meet_y, meet_x - offset)
    u = np.linspace(2 * np.pi - inner_top, inner_top, 40)[1:-1]
    inner_arc = np.stack([offset + inner * np.cos(u), inner * np.sin(u)], 1)
    xy = np.concatenate([outer, inner_arc])
    return xy - [(xy[:, 0].max() + xy[:, 0].min()) / 2, 0]


def cross_polygon(arm: float = 1 / 3) -> np.ndarray:
    a = arm
    return np.array([(-a, 1), (a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a),
                     (-1, a), (-a, a)], dtype=float)


_CIRCLE = _regular(64)
POLYGONS = {
    "circle": _CIRCLE, "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
    "triangle": np.array([(0, 1), (1, -1), (-1, -1)], dtype=float),
    "star": star_polygon(5, 0.45), "heart": _heart(), "cross": cross_polygon(), "crescent": crescent_polygon(),
    "pentagon": _regular(5), "hexagon": _regular(6, 0.0), "star4": star_polygon(4, 0.42), "star6": star_polygon(6, 0.5),
    "ellipse": _CIRCLE * [1.0, 0.55], "rectangle": np.array([(-1, -0.55), (1, -0.55), (1, 0.55), (-1, 0.55)]),
    "semicircle": np.stack([np.cos(np.linspace(0, np.pi, 33)), np.sin(np.linspace(0, np.pi, 33)) - 0.5], 1),
}
RINGS = {"ring": 0.55}  # drawn as a disc with a hole of this radius


def blob_polygon(rng: np.random.Generator) -> np.ndarray:
    """A smooth irregular outline (harmonics 2 and 4 of the radius): a 'potato', far from any named shape. (A third
    harmonic makes two lobes and a point: a heart, near enough to blur the judge's hearts.)"""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(t)
    for k, (lo, hi) in ((2, (0.15, 0.28)), (4, (0.05, 0.15))):
        r += rng.uniform(lo, hi) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    xy = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    return xy / np.abs(xy).max()


def _transform(poly: np.ndarray, attrs: Attributes, scale: float) -> list[tuple[float, float]]:
    a = np.deg2rad(attrs.angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    half = attrs.size * scale / 2
    xy = poly @ rot.T * half
    return [(attrs.cx * scale + x, attrs.cy * scale - y) for x, y in xy]  # y up -> image rows down


def draw(image: Image.Image, attrs: Attributes, colour: tuple | None = None, polygon: np.ndarray | None = None) -> None:
    """Draw one shape (`polygon` overrides the shape's outline) onto a supersampled canvas."""
    scale, fill = image.size[0], colour or COLOURS[attrs.colour]
    pen = ImageDraw.Draw(image)
    if polygon is None and attrs.shape in RINGS:
        pen.polygon(_transform(_CIRCLE, attrs, scale), fill=fill)
        pen.polygon(_transform(_CIRCLE * RINGS[attrs.shape], attrs, scale), fill=BACKGROUNDS[attrs.background])
        return
    if polygon is None and attrs.shape not in POLYGONS:
        raise ValueError(f"shape: expected one of {sorted([*POLYGONS, *RINGS])}, got {attrs.shape!r}")
    pen.polygon(_transform(POLYGONS[attrs.shape] if polygon is None else polygon, attrs, scale), fill=fill)


def render(attrs: Attributes, resolution: int = RESOLUTION, polygon: np.ndarray | None = None) -> Image.Image:
    """The image of `attrs` (a deterministic function of its fields)."""
    s = resolution * SUPERSAMPLE
    image = Image.new("RGB", (s, s), BACKGROUNDS[attrs.background])
    draw(image, attrs, polygon=polygon)
    return image.resize((resolution, resolution), Image.BOX)


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def render_batch(attrs: list[Attributes]) -> torch.Tensor:
    return to_uint8([render(a) for a in attrs])  # (N, 3, 32, 32) uint8


# ---------------------------------------------------------------------------------------------------------------------
# the world's splits
def half_extent(shape: str, size: float, angle: float) -> tuple[float, float]:
    """Half the width and height, as fractions of the image side, of `shape` at `size` turned by `angle` degrees."""
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    xy = POLYGONS.get(shape, _CIRCLE) @ rot.T
    return tuple(float(v) for v in np.abs(xy).max(0) * size / 2)


def sample_attributes(rng: np.random.Generator, shapes: tuple[str, ...], combos: tuple | None = None,
                      size_range: tuple[float, float] = SIZE_RANGE, rotation: float = ROTATION,
                      templates: int = 1) -> Attributes:
    """Random shape, colour, background (or one of `combos`), size, rotation, phrasing, and a position that keeps
    the turned shape inside the image with a 1 px margin (centred where it cannot fit: only the largest shapes
    turned far, which the judges' training data has)."""
    if combos is not None:
        shape, colour, background = combos[int(rng.integers(len(combos)))]
    else:
        shape, colour, background = (str(rng.choice(shapes)), str(rng.choice(list(COLOURS))),
                                     str(rng.choice(list(BACKGROUNDS))))
    size = float(rng.uniform(*size_range))
    angle = float(rng.uniform(-rotation, rotation))
    centre = []
    for extent in half_extent(shape, size, angle):
        margin = extent + 1 / RESOLUTION
        centre.append(float(rng.uniform(margin, 1 - margin)) if margin < 0.5 else 0.5)
    return Attributes(shape, colour, background, size, centre[0], centre[1], angle, int(rng.integers(templates)))


def pretrain_combos() -> tuple[tuple[str, str, str], ...]:
    return tuple((s, c, b) for s in PRETRAIN_SHAPES for c in COLOURS for b in BACKGROUNDS
                 if (s, c, b) not in HELDOUT_COMBOS)


def examples(split: str, n: int, shapes: tuple[str, ...] | None = None) -> list[Attributes]:
    """The first n attributes of a split (deterministic; a longer list starts with the shorter one).

    pretrain: the UNet's data (pretraining shapes, held-out combos excluded, every phrasing); concept_train /
    concept_heldout: `shapes` (default: every concept), first phrasing; reference: every named shape, first phrasing.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {list(SPLIT_SEEDS)}, got {split!r}")
    combos, templates = None, 1
    if split == "pretrain":
        combos, templates = pretrain_combos(), len(TEMPLATES)
    elif shapes is None:
        shapes = CONCEPTS if split.startswith("concept") else SHAPES
    return [sample_attributes(np.random.default_rng([SPLIT_SEEDS[split], i]), shapes, combos, templates=templates)
            for i in range(n)]


def concept_examples(split: str, concept: str, n: int) -> list[Attributes]:
    """n images of one concept (its own stream: adding a concept does not change another's images)."""
    if concept not in CONCEPTS:
        raise ValueError(f"concept: expected one of {CONCEPTS}, got {concept!r}")
    seed = [SPLIT_SEEDS[split], 1000 + CONCEPTS.index(concept)]
    rng = np.random.default_rng(seed)
    return [sample_attributes(rng, (concept,)) for _ in range(n)]


def caption_with_filler(attrs: Attributes, rng: np.random.Generator) -> str:
    """The caption with one filler word put in at a random place (pretraining: words the prompt may carry that
    change nothing in the image, so an unknown word does not derail the words after it)."""
    words = attrs.caption.split(" ")
    words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(FILLERS)))
    return " ".join(words)


def prompt_grid(shapes: tuple[str, ...], repeats: int = 1) -> list[Attributes]:
    """Every colour x background for each shape in canonical form, `repeats` times (evaluation prompts)."""
    return [canonical(s, c, b) for s in shapes for c in COLOURS for b in BACKGROUNDS] * repeats


def kept_grid(repeats: int = 1) -> list[Attributes]:
    """The pretraining prompts (what tuning may forget): every seen combination in canonical form."""
    return [canonical(*combo) for combo in pretrain_combos()] * repeats


def heldout_combo_grid(repeats: int = 1) -> list[Attributes]:
    """The held-out combinations (prompt following beyond memorised captions)."""
    return [canonical(*combo) for combo in HELDOUT_COMBOS] * repeats


def with_shape(attrs: Attributes, shape: str) -> Attributes:
    return replace(attrs, shape=shape)
