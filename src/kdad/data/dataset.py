"""Torch datasets: read, resize to the model's input size, normalise with the teacher's
statistics; the training set (good images, optionally flipped and turned); a validation set of
held-out good images with synthetic defects; a training set with synthetic defects for the
models that learn from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from kdad.data import augment as views
from kdad.data.io import image_shape, read_image, read_mask
from kdad.data.layouts import Sample
from kdad.errors import KdadError

AUTO = "auto"  # data.image_size chosen from the training images (choose_size)
AUTO_PIXELS = 256 * 256  # the automatic input's pixel count
SQUASH_LIMIT = 1.5  # a square may squash an image this much along one axis, no more
ONE_ASPECT = 1.25  # images share one aspect: 90% of them within this ratio of each other


def input_hw(image_size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """The model's input (height, width) from ``data.image_size``: one side for a square, or
    [height, width] for parts whose aspect a square would distort."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and v >= 32 for v in hw):
        raise KdadError(
            f"image_size must be {AUTO!r}, one size or [height, width], each an integer >= 32; "
            f"got {image_size!r}"
        )
    return hw


def check_image_size(image_size: int | list[int] | str) -> None:
    """Refuse a ``data.image_size`` that is neither ``auto`` nor a size."""
    if image_size != AUTO:
        input_hw(image_size)


def _shapes(samples: list[Sample]) -> np.ndarray:
    return np.array([image_shape(s.path) for s in samples], dtype=np.float64)  # (N, 2)


def keep_aspect(h: float, w: float, pixels: int, multiple: int) -> tuple[int, int]:
    """(height, width) of aspect ``h``:``w`` at about ``pixels`` pixels, each side a multiple of
    ``multiple`` (what the model's deepest stage needs)."""
    side = np.sqrt(pixels / (h * w))
    return tuple(max(multiple, round(float(v * side) / multiple) * multiple) for v in (h, w))


def choose_size(samples: list[Sample], multiple: int) -> tuple[int | list[int], str]:
    """``data.image_size: auto``: 256x256, unless the training images share one aspect (90% of
    them within 1.25x of each other) that a square would squash more than 1.5x; then that aspect
    at about 256x256's pixel count, sides multiples of ``multiple``. Returns the size and the
    line that says what it is, why, and how to go finer."""
    shapes = _shapes(samples)
    h, w = np.median(shapes, axis=0)
    aspect = shapes[:, 0] / shapes[:, 1]
    lo, hi = np.percentile(aspect, [5, 95])
    squash = max(h / w, w / h)
    typical = f"typically {int(h)}x{int(w)}"
    if squash > SQUASH_LIMIT and hi / lo <= ONE_ASPECT:
        hw = keep_aspect(h, w, AUTO_PIXELS, multiple)
        return list(hw), (
            f"kdad: input {hw[0]}x{hw[1]} (height x width), chosen: the training images share "
            f"one aspect ({typical}), which a square would squash {squash:.1f}x; "
            "--image-size 256 for a square"
        )
    side = int(np.sqrt(AUTO_PIXELS))
    text = f"kdad: input {side}x{side} (training images {typical}"
    if max(h, w) > 2 * side:
        text += (
            f": one input pixel covers {h / side:.0f}x{w / side:.0f} image pixels; --image-size "
            "H W for finer detail, at about (H x W / 65536) times the time"
        )
    return side, text + ")"


def squash_advice(
    samples: list[Sample], hw: tuple[int, int], multiple: int = 32, limit: float = SQUASH_LIMIT
) -> str | None:
    """A warning when resizing to ``hw`` squashes the typical (median-aspect) image more than
    ``limit`` times along one axis, a thin defect along the other axis fading with it; with the
    ``image_size`` that would keep its aspect at the same pixel count, in multiples of
    ``multiple`` (what the model needs). None when it fits."""
    if not samples:
        return None
    h, w = np.median(_shapes(samples), axis=0)
    squash = (h / w) / (hw[0] / hw[1])
    if max(squash, 1 / squash) <= limit:
        return None
    keep = keep_aspect(h, w, hw[0] * hw[1], multiple)
    axis = "height" if squash > 1 else "width"
    return (
        f"training images are typically {int(h)}x{int(w)} (height x width) but are resized to "
        f"{hw[0]}x{hw[1]}, squashing their {axis} {max(squash, 1 / squash):.1f}x, where thin "
        f"defects fade; to keep their aspect pass --image-size {keep[0]} {keep[1]} "
        f"(image_size: [{keep[0]}, {keep[1]}])"
    )


def resize_image(img: Tensor, size: int | tuple[int, int]) -> Tensor:
    """(3, H, W) in [0, 1] -> (3, h, w) of ``size`` (side or (h, w)), bilinear, antialiased.

    The input is made contiguous first: an image permuted from (H, W, 3) resizes 15-20x slower
    in place, to the same bits."""
    return F.interpolate(
        img.contiguous()[None],
        size=input_hw(size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].clamp_(0, 1)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) {0, 1} -> (h, w) {0, 1}: a pixel is defective if over half of it was."""
    m = F.interpolate(mask.float()[None, None], size=size, mode="bilinear")
    return (m[0, 0] > 0.5).float()


def preprocess(img: np.ndarray, size: int | tuple[int, int], mean: Tensor, std: Tensor) -> Tensor:
    """(H, W, 3) float image in [0, 1] -> model input (3, h, w), normalised."""
    x = torch.from_numpy(img).permute(2, 0, 1)  # (3, H, W)
    return (resize_image(x, size) - mean) / std


class ImageDataset(Dataset):
    """Samples as dicts: image (3, H, W) normalised, mask (H, W), has_mask, label, index."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int | tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.samples = samples
        self.size = input_hw(image_size)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> Tensor:
        """An image file as (3, H, W) in [0, 1], resized, not yet normalised."""
        return resize_image(torch.from_numpy(read_image(path)).permute(2, 0, 1), self.size)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = self.samples[i]
        img = read_image(s.path)  # (H, W, 3)
        mask = torch.zeros(self.size)
        if s.mask is not None:
            m = torch.from_numpy(read_mask(s.mask))  # (h, w)
            if m.shape != img.shape[:2]:
                raise KdadError(
                    f"{s.mask}: mask is {tuple(m.shape)} but its image {s.path.name} is "
                    f"{img.shape[:2]}"
                )
            mask = resize_mask(m, self.size)  # (H, W)
        # A defective image without a mask has unknown defect pixels: kept out of pixel metrics.
        has_mask = s.label != 1 or s.mask is not None
        return {
            "image": preprocess(img, self.size, self.mean, self.std),
            "mask": mask,
            "has_mask": torch.tensor(has_mask),
            "label": torch.tensor(s.label),
            "index": torch.tensor(i),
        }


class TrainSet(ImageDataset):
    """Good training images (dicts: image, index), each epoch in a random view of ``augment``
    (see data/augment.py) fixed by (seed, epoch, index): resuming replays the same views.

    Every epoch reads the same files, so each image is decoded and resized once and kept, while
    ``cache_bytes`` allows (on Magnetic Tile, an epoch of a width-16 STU-Seg on 2 cores takes
    9 s instead of 10.3-11.4); the items are the same, cached or not."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int | tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        seed: int = 0,
        augment: list[str] | tuple[str, ...] = (),
        cache_bytes: float = 0.0,
    ) -> None:
        super().__init__(samples, image_size, mean, std)
        views.check_augment(list(augment), self.size)
        self.seed, self.augment, self.epoch, self.phase = seed, list(augment), 0, ""
        self.cache_bytes, self.cached = cache_bytes, {}

    def teacher_inputs(self) -> tuple[TrainSet, str] | None:
        """Images whose teacher features repeat every epoch, and the batch key that indexes
        them: these very images ("index"), when they come in no views; else None."""
        return None if self.augment else (self, "index")

    def set_epoch(self, epoch: int, phase: str = "") -> None:
        """The epoch about to run, and the model's training phase in it (models/base.Phase)."""
        self.epoch, self.phase = epoch, phase

    def view(self, i: int) -> tuple[bool, bool, int]:
        """This epoch's view of image ``i`` (its own generator: other draws stay unchanged)."""
        return views.draw(self.augment, np.random.default_rng([self.seed, self.epoch, i, 1]))

    def image(self, i: int) -> Tensor:
        """Image ``i`` resized, in [0, 1], (3, H, W): from the cache, or decoded (and cached
        while the budget allows)."""
        x = self.cached.get(i)
        if x is None:
            x = self.load(self.samples[i].path)
            if (len(self.cached) + 1) * x.numel() * x.element_size() <= self.cache_bytes:
                self.cached[i] = x
        return x

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = views.apply(self.image(i), self.view(i))  # (3, H, W)
        return {"image": (x - self.mean) / self.std, "index": torch.tensor(i)}
