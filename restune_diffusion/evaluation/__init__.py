"""Evaluation the way the field reports it: FID, KID and CLIP score over models x guidance scales, N processes.

One concept a file: `sweep` (the one loop: every model x guidance scale of a protocol -> generate -> collect -> every
registered metric, restune_diffusion.metrics), `inception` (the FID Inception-v3 and its image path), `features`
(feature extraction, the real-features cache), `clip_score` (CLIP score from a local CLIP), `coco` (the caption
protocol), `images` (generation by image index, image folders), `runner` (the COCO protocol and folder mode ->
eval.json, eval.md, fid_vs_clip.png). The tiny world's protocol lives in world/evaluation.py; eval_fid.py runs it here.
"""
