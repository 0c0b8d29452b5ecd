"""Tag-list captions the kohya way (issue 27): `--shuffle_caption`, `--keep_tokens N`, `--caption_tag_dropout_rate p`
and `--keep_tokens_separator`, applied to the caption drawn for item i of epoch e.

A caption "sks dog, sitting, grass, sunny" is a list of tags split at commas. The first `keep_tokens` tags stay in
front and are never dropped (the trigger word); the rest are shuffled and each dropped with probability p. With a
separator ("sks dog ||| sitting, grass"), the tags before it are the kept ones whatever keep_tokens says, and tags
after a second separator stay at the end (kohya's fixed suffix). The random draws come from a generator the dataset
seeds with (seed, epoch, index), so a resumed or multi-process run sees the captions an uninterrupted one saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEPARATOR = ","  # kohya's --caption_separator default


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout_rate: float = 0.0
    keep_tokens_separator: str | None = None

    def __post_init__(self):
        if not isinstance(self.keep_tokens, int) or isinstance(self.keep_tokens, bool) or self.keep_tokens < 0:
            raise ValueError(f"--keep_tokens must be an integer >= 0, got {self.keep_tokens!r}")
        rate = self.caption_tag_dropout_rate
        if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"--caption_tag_dropout_rate must be a probability in [0, 1], got {rate!r}")
        if self.keep_tokens_separator is not None and not str(self.keep_tokens_separator).strip():
            raise ValueError("--keep_tokens_separator must be a non-blank string such as '|||', got "
                             f"{self.keep_tokens_separator!r}")

    @property
    def active(self) -> bool:
        """Whether captions are rewritten at all (a separator is always taken out of the text)."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0 or bool(self.keep_tokens_separator)


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(SEPARATOR) if t.strip()]


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, shuffled/droppable, kept at the end) tags of a caption."""
    sep = options.keep_tokens_separator
    if sep and sep in caption:
        front, rest = caption.split(sep, 1)
        middle, _, end = rest.partition(sep)
        return _tags(front), _tags(middle), _tags(end)
    tags = _tags(caption)
    return tags[: options.keep_tokens], tags[options.keep_tokens:], []


def process_caption(caption: str, options: CaptionOptions, rng: np.random.Generator) -> str:
    """The caption as the text encoder sees it this epoch: kept tags, then the others shuffled (--shuffle_caption)
    and thinned (--caption_tag_dropout_rate), then the fixed suffix; joined with ", "."""
    if not options.active:
        return caption
    front, middle, end = split_tags(caption, options)
    if options.shuffle_caption and len(middle) > 1:
        middle = [middle[i] for i in rng.permutation(len(middle))]
    if options.caption_tag_dropout_rate > 0:
        keep = rng.random(len(middle)) >= options.caption_tag_dropout_rate
        middle = [t for t, k in zip(middle, keep) if k]
    return ", ".join(front + middle + end)
