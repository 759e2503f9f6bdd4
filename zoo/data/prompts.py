"""Caption templates of the class-caption data (one ``{}`` for the class name): training templates and DISJOINT
held-out templates for zero-shot evaluation (:func:`check_templates`), per dataset."""

from __future__ import annotations

from collections.abc import Sequence

DIGIT_WORDS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Templates are lists of strings with one "{}" for the class name. Train and held-out sets are disjoint.
MNIST_TRAIN_TEMPLATES: list[str] = [
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "an image of a {}.",
    "a drawing of the number {}.",
    "a black and white photo of a {}.",
    "a scan of a handwritten {}.",
    "{}.",
]
MNIST_HELDOUT_TEMPLATES: list[str] = [
    "a picture of the digit {}.",
    "a close-up photo of a {}.",
    "this is a {}.",
    "a blurry image of the number {}.",
    "someone wrote the digit {}.",
    "a low resolution photo of the number {}.",
]
# From CLIP's ImageNet / CIFAR prompt list, split in two.
CIFAR10_TRAIN_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a low resolution photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of a big {}.",
    "a pixelated photo of the {}.",
]
CIFAR10_HELDOUT_TEMPLATES: list[str] = [
    "a black and white photo of the {}.",
    "a photo of the small {}.",
    "a good photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a photo of my {}.",
]



def check_templates(train: Sequence[str], heldout: Sequence[str]) -> None:
    """Raise a ValueError unless both lists are non-empty, every template has exactly one ``{}``, and no
    held-out template appears among the training templates (compared case- and space-insensitively)."""
    for name, group in (("train_templates", train), ("zero_shot_templates", heldout)):
        if not group:
            raise ValueError(f"{name} must not be empty")
        bad = [t for t in group if not isinstance(t, str) or t.count("{}") != 1]
        if bad:
            raise ValueError(f"every template needs exactly one '{{}}' for the class name; bad in {name}: {bad}")
    norm = {" ".join(t.lower().split()) for t in train}
    overlap = [t for t in heldout if " ".join(t.lower().split()) in norm]
    if overlap:
        raise ValueError(f"zero-shot templates must not be seen in training; these are in both: {overlap}")
