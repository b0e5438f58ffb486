"""Somepalli et al.: random words added to a caption each time it is drawn."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from lethe.declarations import Section, TrainingMethod


class RandomCaptionConfig(Section):
    words: int = Field(2, ge=1)  # random caption words added to a caption when it is drawn
    probability: float = Field(1.0, ge=0.0, le=1.0)
    seed: int = 0


class RandomCaptionWords:
    """Append random words from the captions' vocabulary each time a caption is drawn. The words of a draw
    (step, position in the batch) come from a generator seeded by it, so a resumed run draws the same."""

    def __init__(self, captions: list[str], words: int, probability: float, seed: int):
        self.vocabulary = sorted({w for c in captions for w in c.split()})
        self.words, self.probability, self.seed = words, probability, seed

    def __call__(self, caption: str, draw: tuple[int, int] = (0, 0)) -> str:
        rng = np.random.default_rng([self.seed, *(d + 1 for d in draw)])  # step -1 (no step) stays >= 0
        if rng.random() >= self.probability:
            return caption
        return " ".join([caption, *rng.choice(self.vocabulary, self.words)])


def caption_noise(params, captions: list[str]) -> RandomCaptionWords:
    cfg = params.random_caption
    return RandomCaptionWords(captions, cfg.words, cfg.probability, cfg.seed)


METHOD = TrainingMethod("random_caption", "random words added to captions", section="random_caption",
                        schema=RandomCaptionConfig, reads=("random_caption",), caption_noise=caption_noise)
