"""Evaluation the way the field reports it: FID, KID and CLIP score over models x guidance scales, N processes.

One concept a file: `inception` (the FID Inception-v3 and its image path), `metrics` (FID/KID from features, the
real-features cache), `clip_score` (CLIP score from a local CLIP), `coco` (the caption protocol), `images`
(generation by image index, image folders), `runner` (models x scales -> eval.json, eval.md, fid_vs_clip.png).
"""
