"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(E_image, E_text), 0), mean over pairs.

Computed with transformers' CLIPModel directly (torchmetrics 1.9's CLIPScore crashes with transformers 5.x,
torchmetrics PR #3428): the forward's projected `image_embeds` / `text_embeds`, normalised. The model is a local
folder (`--clip_model DIR`, or $RESTUNE_CLIP_MODEL); SD v1.x model cards use openai/clip-vit-large-patch14.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_ENV = "RESTUNE_CLIP_MODEL"
STANDARD_CLIP = "openai/clip-vit-large-patch14"
EXPECTED = ("config.json", "model.safetensors (or pytorch_model.bin), the tokenizer files (vocab.json, merges.txt) "
            "and preprocessor_config.json")


def resolve_clip_folder(path: str | os.PathLike | None) -> Path | None:
    """The CLIP folder from the flag or $RESTUNE_CLIP_MODEL; None when neither is given (no CLIP score)."""
    given = path if path is not None else os.environ.get(CLIP_ENV)
    if not given:
        return None
    folder = Path(given)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--clip_model {folder}: expected a local CLIP folder (the {STANDARD_CLIP} of SD v1.x model cards, "
            f"saved with save_pretrained: {EXPECTED}); nothing is downloaded here.")
    return folder


class CLIPScorer:
    """A local CLIP model scoring (image, caption) pairs. Text longer than the model's context is truncated."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.folder = Path(folder)
        try:
            self.model = CLIPModel.from_pretrained(self.folder).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(self.folder)
            self.processor = CLIPImageProcessorPil.from_pretrained(self.folder)
        except (OSError, ValueError) as err:
            raise ValueError(f"--clip_model {self.folder}: not a loadable CLIP folder ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); expected {EXPECTED}") from None
        self.device = torch.device(device)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """(N,) float64: 100 * max(cosine, 0) per pair."""
        if len(images) != len(texts):
            raise ValueError(f"CLIP score: {len(images)} images vs {len(texts)} captions")
        text = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                         pixel_values=pixels.to(self.device, self.model.dtype))
        image = out.image_embeds.double()  # (N, P), normalised by the forward; again, to be sure
        caption = out.text_embeds.double()
        cosine = torch.nn.functional.cosine_similarity(image, caption, dim=-1)
        return (100.0 * cosine.clamp(min=0)).cpu().numpy()
