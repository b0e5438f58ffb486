"""Unique captions for the embedded digits, shaped like web alt-text.

Every image gets its digit's word plus descriptors drawn without replacement, so no two images share a
caption (as on the web, where a caption nearly always names one image). A caption can then act as the
key a model memorizes its image under. With `data.nonce_words`, the captions of the pictures pretraining
never sees also end with a made-up word of their own (`nonce_words`): a unique label in tokens no
pretraining caption uses, which Gu et al. (2023) found raises memorization.
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


SYLLABLES = ("ka", "zu", "mi", "ro", "ve", "ti", "xo", "pa", "ne", "lu", "sha", "quo", "bri", "dov", "fen", "gor")


def nonce_words(n: int, seed: int, avoid: set[str] = frozenset()) -> list[str]:
    """`n` distinct made-up words of three syllables, drawn reproducibly, none in `avoid`."""
    rng = np.random.default_rng(seed)
    pool = ["".join(p) for p in itertools.product(SYLLABLES, repeat=3)]
    pool = [pool[i] for i in rng.permutation(len(pool)) if pool[i] not in avoid]
    if n > len(pool):
        raise ValueError(f"{n} nonce words asked for, but only {len(pool)} can be made")
    return pool[:n]


def with_nonce_words(captions: list[str], splits: list[str], seed: int) -> list[str]:
    """Each caption outside the pretraining split, ending with "signed <word>", a word of its own."""
    chosen = [i for i, split in enumerate(splits) if split != "pretrain"]
    words = nonce_words(len(chosen), seed, avoid={w for c in captions for w in c.split()})
    out = list(captions)
    for i, word in zip(chosen, words):
        out[i] = f"{captions[i]} signed {word}"
    return out
