"""Second views for `--inmodal`: AutoAugment for images and EDA-style edits for captions.

CyCLIP (whose code the original RankCLIP code keeps) augments captions with EDA (Wei & Zou, 2019), whose synonym operations need
WordNet. Offline we keep the three operations that need no corpus, applied to a copy of the
caption's own words: random swap, random deletion and random insertion (of a word already in
the caption). All randomness comes from the generator passed in, so a sample's second view is
fixed by its (seed, epoch, index).
"""

from __future__ import annotations

import random
from typing import Callable

from PIL import Image
from torchvision import transforms

EDIT_FRACTION = 0.1  # share of the words touched by each operation (EDA's alpha)


def swap_words(words: list[str], count: int, rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(count):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return words


def delete_words(words: list[str], probability: float, rng: random.Random) -> list[str]:
    kept = [w for w in words if rng.random() >= probability]
    return kept or [rng.choice(words)]


def insert_words(words: list[str], count: int, rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(count):
        words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    return words


def augment_caption(caption: str, rng: random.Random) -> str:
    """One EDA edit chosen at random (swap, delete or insert); captions of one word stay as they are."""
    words = caption.split()
    if len(words) < 2:
        return caption
    count = max(1, round(EDIT_FRACTION * len(words)))
    operation = rng.choice(("swap", "delete", "insert"))
    if operation == "swap":
        words = swap_words(words, count, rng)
    elif operation == "delete":
        words = delete_words(words, EDIT_FRACTION, rng)
    else:
        words = insert_words(words, count, rng)
    return " ".join(words)


class AugmentedImage:
    """AutoAugment (ImageNet policy, torch RNG) followed by the model's training transform."""

    def __init__(self, transform: Callable) -> None:
        self.auto, self.transform = transforms.AutoAugment(), transform

    def __call__(self, image: Image.Image):
        return self.transform(self.auto(image))
