"""Label-preserving augmentation of good training images: flips and quarter turns.

A part photographed from above often looks as normal mirrored or turned (tiles, textures,
surfaces) as it does upright; training on those views shows the student more of "normal". Only
name the ones that hold for your part: a connector turned 90 degrees is a defect."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from kdad.errors import KdadError

AUGMENTATIONS = ("hflip", "vflip", "rot90")


def check_augment(ops: list[str], size: tuple[int, int]) -> None:
    """Reject unknown names, and quarter turns of non-square inputs (they change the shape)."""
    bad = [op for op in ops if op not in AUGMENTATIONS]
    if bad:
        raise KdadError(f"unknown augmentation {bad[0]!r}; known: {', '.join(AUGMENTATIONS)}")
    if "rot90" in ops and size[0] != size[1]:
        raise KdadError(
            f"rot90 needs a square image size, got {size[0]}x{size[1]}; use hflip and vflip"
        )


def draw(ops: list[str], rng: np.random.Generator) -> tuple[bool, bool, int]:
    """One random view: (horizontal flip, vertical flip, quarter turns), each op with even odds."""
    h = "hflip" in ops and bool(rng.random() < 0.5)
    v = "vflip" in ops and bool(rng.random() < 0.5)
    k = int(rng.integers(4)) if "rot90" in ops else 0
    return h, v, k


def apply(x: Tensor, view: tuple[bool, bool, int]) -> Tensor:
    """The view of an image (C, H, W) or mask (H, W): flips, then counter-clockwise turns."""
    h, v, k = view
    if h:
        x = x.flip(-1)
    if v:
        x = x.flip(-2)
    return x.rot90(k, (-2, -1)) if k else x
