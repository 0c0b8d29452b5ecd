"""FID for Stable Diffusion v1.5: kept as a name; the code lives in restune_diffusion.evaluation (one concept a file).

This module re-exports what earlier code imported from here.
"""

from __future__ import annotations

from .evaluation.coco import PROTOCOL, PROTOCOL_VERSION
from .evaluation.images import IMAGE_SUFFIXES, check_generation_record, generate_by_index, list_images
from .evaluation.inception import (
    INCEPTION_SIZE,
    NUM_FEATURES,
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    WEIGHTS_SHA256,
    WEIGHTS_URL,
    FIDInceptionV3,
    file_sha256,
    inception_image,
    load_fid_inception,
    resolve_inception_weights,
    square_resize,
    tf32_disabled,
    weights_hash_warning,
)
from .evaluation.metrics import (
    COCO_FULL_N,
    extract_features,
    fid_from_features,
    fid_metric,
    fid_value,
    kid_from_features,
    sample_size_warnings,
)
from .evaluation.runner import evaluate, evaluate_folders

__all__ = [
    "COCO_FULL_N", "IMAGE_SUFFIXES", "INCEPTION_SIZE", "NUM_FEATURES", "PROTOCOL", "PROTOCOL_VERSION", "WEIGHTS_ENV",
    "WEIGHTS_FILE", "WEIGHTS_SHA256", "WEIGHTS_URL", "FIDInceptionV3", "check_generation_record", "evaluate",
    "evaluate_folders", "extract_features", "fid_from_features", "fid_metric", "fid_value", "file_sha256",
    "generate_by_index", "inception_image", "kid_from_features", "list_images", "load_fid_inception",
    "resolve_inception_weights", "sample_size_warnings", "square_resize", "tf32_disabled", "weights_hash_warning",
]
