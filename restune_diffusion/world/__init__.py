"""The tiny world: a synthetic captioned domain in which generation quality is real and measurable on a CPU
(issues 14, 23). One home for its scenes (scene.py), its concept data sets in users' formats (datasets.py), its
judges (judge.py), its measuring protocol and statistics (protocol.py) and the reports built on them (report.py).

The tiny base (`--pretrained_model_name_or_path tiny`, made by tools/pretrain_tiny.py) is pretrained on circles,
squares and triangles in every colour x background but six held-out combinations; four concepts (star, heart,
cross, crescent) are never in its pretraining data and are the fine-tuning tasks, like the paper's fine-grained
sets. A judge trained on what it will see (autoencoder round trips, hard negatives, an explicit 'none') says which
shape, colour and background an image shows; an independent check judge measures how far to believe it.
"""

from ..models import TINY_ASSETS as ASSETS
from ..models import TINY_PRETRAIN_COMMAND as PRETRAIN_COMMAND
from .datasets import (
    CONCEPT,
    CONCEPT_TRAIN_N,
    concept_train_set,
    use_concept_data,
    write_class_folders,
    write_coco_layout,
    write_concept_datasets,
    write_imagefolder,
)
from .judge import HEADS, SHAPE_CLASSES, JudgeNet, load_judge, predict, round_trip
from .protocol import GUIDANCE_SCALE, SAMPLING_STEPS, accuracy, bootstrap, frechet, generate, hits, kid
from .report import Measurement, before_after_report, load_judges, measure, prompt_sets
from .scene import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    HELDOUT_COMBOS,
    NONE,
    OTHER_SHAPES,
    PRETRAIN_SHAPES,
    RESOLUTION,
    SHAPES,
    Attributes,
    canonical,
    concept_examples,
    examples,
    heldout_combo_grid,
    kept_grid,
    prompt_grid,
    render,
    render_batch,
    to_uint8,
)

__all__ = [
    "ASSETS", "PRETRAIN_COMMAND", "CONCEPT", "CONCEPT_TRAIN_N", "concept_train_set", "use_concept_data",
    "write_class_folders", "write_coco_layout", "write_concept_datasets", "write_imagefolder", "HEADS",
    "SHAPE_CLASSES", "JudgeNet", "load_judge", "predict", "round_trip", "GUIDANCE_SCALE", "SAMPLING_STEPS",
    "accuracy", "bootstrap", "frechet", "generate", "hits", "kid", "Measurement", "before_after_report",
    "load_judges", "measure", "prompt_sets", "BACKGROUNDS", "COLOURS", "CONCEPTS", "HELDOUT_COMBOS", "NONE",
    "OTHER_SHAPES", "PRETRAIN_SHAPES", "RESOLUTION", "SHAPES", "Attributes", "canonical", "concept_examples",
    "examples", "heldout_combo_grid", "kept_grid", "prompt_grid", "render", "render_batch", "to_uint8",
]
