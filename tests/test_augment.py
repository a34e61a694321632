import random
from collections import Counter

import numpy as np
import torch
from PIL import Image

from rankclip.config import CsvLayout
from rankclip.augment import AugmentedImage, augment_caption, delete_words, insert_words, swap_words
from rankclip.csv_index import open_caption_rows
from rankclip.data import CaptionDataset, SampleMaker

WORDS = "a small red circle near the top of a grey background".split()


def test_swap_keeps_the_words():
    swapped = swap_words(WORDS, 3, random.Random(0))
    assert Counter(swapped) == Counter(WORDS) and swapped != WORDS


def test_delete_never_empties_a_caption():
    assert delete_words(["one", "two"], 1.0, random.Random(0)) in (["one"], ["two"])
    kept = delete_words(WORDS, 0.3, random.Random(1))
    assert 0 < len(kept) < len(WORDS) and all(w in WORDS for w in kept)


def test_insert_adds_words_of_the_caption():
    longer = insert_words(WORDS, 2, random.Random(2))
    assert len(longer) == len(WORDS) + 2 and set(longer) == set(WORDS)


def test_caption_edits_are_seeded():
    caption = " ".join(WORDS)
    assert augment_caption(caption, random.Random(5)) == augment_caption(caption, random.Random(5))
    assert len({augment_caption(caption, random.Random(s)) for s in range(20)}) > 3
    assert augment_caption("cat", random.Random(0)) == "cat"


def test_inmodal_samples_carry_seeded_second_views(colour_data):
    rows = open_caption_rows(colour_data["train"], CsvLayout("image", "caption", ","))
    transform = lambda image: torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32))  # noqa: E731
    tokenizer = lambda texts: torch.tensor([[sum(map(ord, t)), len(t.split())] for t in texts])  # noqa: E731
    dataset = CaptionDataset(rows, SampleMaker(transform, tokenizer, inmodal=True), seed=0)
    first, again = dataset[(1, 7)], dataset[(1, 7)]
    assert {"augmented_image", "augmented_text"} <= set(first)
    assert torch.equal(first["augmented_image"], again["augmented_image"])
    assert torch.equal(first["augmented_text"], again["augmented_text"])
    changed = [not torch.equal(dataset[(e, 7)]["augmented_image"], first["image"]) for e in range(8)]
    assert any(changed)


def test_augmented_image_has_the_model_input_shape():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    out = AugmentedImage(lambda im: torch.tensor(im.size))(image)
    assert out.tolist() == [40, 30]
