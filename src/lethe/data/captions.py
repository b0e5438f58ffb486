"""Unique captions for the embedded digits, shaped like web alt-text.

Every image gets its digit's word plus descriptors drawn without replacement, so no two images share a
caption (as on the web, where a caption nearly always names one image). A caption can then act as the
key a model memorizes its image under.
"""

from __future__ import annotations

import itertools

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

STYLES = (
    "bold", "thin", "slanted", "upright", "neat", "messy", "tall", "wide", "small", "round",
    "sharp", "faded", "smudged", "shaky", "curly", "blocky",
)
SOURCES = (
    "a tax form", "a postal code", "a school exam", "a bank cheque", "a census sheet", "a receipt",
    "a notebook", "a whiteboard", "a ledger", "a parcel label", "a survey card", "a timesheet",
)


def caption_pool(label: int) -> list[str]:
    """Every caption a digit can get: ordered pairs of distinct styles times sources."""
    word = DIGIT_WORDS[label]
    return [
        f"{'an' if first[0] in 'aeiou' else 'a'} {first} {second} handwritten {word} from {source}"
        for first, second in itertools.permutations(STYLES, 2)
        for source in SOURCES
    ]


def unique_captions(labels: np.ndarray, seed: int) -> list[str]:
    """One caption per label, all different, drawn reproducibly from the pool."""
    rng = np.random.default_rng(seed)
    captions: list[str | None] = [None] * len(labels)
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label)
        pool = caption_pool(int(label))
        if len(positions) > len(pool):
            raise ValueError(f"{len(positions)} images of digit {label} but only {len(pool)} captions")
        for position, choice in zip(positions, rng.choice(len(pool), size=len(positions), replace=False)):
            captions[position] = pool[choice]
    return captions  # type: ignore[return-value]
