"""Training data: COCO 2017 captions, image folders with metadata.jsonl, the fine-grained sets in their published
layouts, Hugging Face `datasets` data sets, a synthetic demo.

Every format becomes a list of `Sample(path, captions)` and one `CaptionDataset`. Before any model is loaded,
`load_dataset` scans the data (PITFALLS "silent caption loss", diffusers #3674/#6445): it says which metadata file and
columns it used and stops with an error naming the file when a caption or an image is bad; by default it decodes
every image once and caches the result (scan.py). Images are read for real (images.py: EXIF orientation, 16-bit,
transparency, aspect bound). All randomness of a sample (caption choice and dropout, crop, flip) is a function of
(seed, epoch, index), so a resumed run sees the same data.

One file per concept: images.py (reading), formats.py (COCO and image-folder layouts -> samples), kohya.py (caption
files beside the images, N_name repeat folders), captions.py (tag shuffling and dropout), buckets.py (aspect-ratio
buckets and their batch sampler), finegrained.py
(CUB, Dogs, Cars, Flowers, Aircraft, Food, class folders), hf.py (`datasets` -> an image folder), scan.py (the
start-up scan and its cache), dataset.py (transform, dataset, loader, cached latents, prior preservation's pairs),
demo.py (the synthetic set).
"""

from .buckets import (
                      BUCKET_FILE,
                      BucketBatchSampler,
                      BucketSpec,
                      BucketTable,
                      bucket_rows,
                      cover_size,
                      eval_batches,
                      kept_fraction,
                      report_buckets,
)
from .captions import CaptionOptions, process_caption
from .dataset import (
                      INTERPOLATION_MODES,
                      CachedLatentsDataset,
                      CaptionDataset,
                      EpochSampler,
                      ImageTransform,
                      PairedDataset,
                      TaskDatasets,
                      build_dataloader,
                      coco_caption_pairs,
                      collate_fn,
                      load_dataset,
                      paired_collate,
                      sample_rng,
                      task_collate,
                      tokenize_captions,
                      torch_seed,
)
from .demo import make_demo_dataset
from .finegrained import FLOWERS102_NAMES, SETS, find_layout, finegrained_samples
from .formats import (
                      DEFAULT_TEMPLATE,
                      METADATA_FILES,
                      Sample,
                      ScanReport,
                      clean_class_name,
                      fix_articles,
                      image_files,
)
from .hf import export_images, open_split
from .images import (
                      IMAGE_EXTENSIONS,
                      MAX_ASPECT_RATIO,
                      PIL_ERRORS,
                      SKIP_HINT,
                      BadImageError,
                      image_problem,
                      load_rgb,
                      to_rgb,
)
from .kohya import CAPTION_EXTENSIONS, KOHYA_DATA_KEYS, KOHYA_FLAGS, kohya_samples
from .scan import (
                      CAPTION_MODES,
                      FINEGRAINED_KINDS,
                      KINDS,
                      SCAN_MODES,
                      check_images,
                      detect_kind,
                      scan_dataset,
                      scan_samples,
                      subset,
                      write_caption_set,
)

__all__ = [
    "BUCKET_FILE", "BucketBatchSampler", "BucketSpec", "BucketTable", "bucket_rows", "cover_size", "eval_batches",
    "kept_fraction", "report_buckets",
    "CAPTION_EXTENSIONS", "CAPTION_MODES", "KOHYA_DATA_KEYS", "KOHYA_FLAGS", "CaptionOptions",
    "kohya_samples", "process_caption", "DEFAULT_TEMPLATE", "FINEGRAINED_KINDS", "FLOWERS102_NAMES", "IMAGE_EXTENSIONS",
    "INTERPOLATION_MODES", "KINDS", "MAX_ASPECT_RATIO", "METADATA_FILES", "PIL_ERRORS", "SCAN_MODES", "SETS",
    "SKIP_HINT", "BadImageError", "CachedLatentsDataset", "CaptionDataset", "EpochSampler", "ImageTransform", "Sample",
    "ScanReport", "build_dataloader", "check_images", "clean_class_name", "coco_caption_pairs", "collate_fn",
    "detect_kind", "export_images", "find_layout", "finegrained_samples", "fix_articles", "image_files",
    "image_problem", "load_dataset", "load_rgb", "make_demo_dataset", "open_split", "PairedDataset", "paired_collate",
    "sample_rng", "scan_dataset", "TaskDatasets", "task_collate",
    "scan_samples", "subset", "tokenize_captions", "to_rgb", "torch_seed", "write_caption_set",
]
