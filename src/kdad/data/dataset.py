"""Torch datasets: read, resize to a square, normalise with the teacher's statistics; a
validation set of held-out good images with synthetic defects; a training set with synthetic
defects for the models that learn from them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from kdad.data.io import read_image, read_mask
from kdad.data.layouts import Sample
from kdad.data.synth import synthesize
from kdad.errors import KdadError


def resize_image(img: Tensor, size: int) -> Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size), bilinear with antialiasing."""
    return F.interpolate(
        img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0].clamp_(0, 1)


def preprocess(img: np.ndarray, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """(H, W, 3) float image in [0, 1] -> model input (3, size, size), normalised."""
    x = torch.from_numpy(img).permute(2, 0, 1)  # (3, H, W)
    return (resize_image(x, size) - mean) / std


class ImageDataset(Dataset):
    """Samples as dicts: image (3, S, S) normalised, mask (S, S), has_mask, label, index."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.samples = samples
        self.size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> Tensor:
        """An image file as (3, S, S) in [0, 1], resized, not yet normalised."""
        return resize_image(torch.from_numpy(read_image(path)).permute(2, 0, 1), self.size)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = self.samples[i]
        img = read_image(s.path)  # (H, W, 3)
        mask = torch.zeros(self.size, self.size)
        if s.mask is not None:
            m = torch.from_numpy(read_mask(s.mask)).float()  # (h, w)
            if m.shape != img.shape[:2]:
                raise KdadError(
                    f"{s.mask}: mask is {tuple(m.shape)} but its image {s.path.name} is "
                    f"{img.shape[:2]}"
                )
            m = F.interpolate(m[None, None], size=(self.size, self.size), mode="bilinear")
            mask = (m[0, 0] > 0.5).float()  # (S, S)
        # A defective image without a mask has unknown defect pixels: kept out of pixel metrics.
        has_mask = s.label != 1 or s.mask is not None
        return {
            "image": preprocess(img, self.size, self.mean, self.std),
            "mask": mask,
            "has_mask": torch.tensor(has_mask),
            "label": torch.tensor(s.label),
            "index": torch.tensor(i),
        }


class SyntheticValidationSet(ImageDataset):
    """Held-out good images, each twice: as it is (label 0) and with a synthetic Perlin defect
    (label 1, its mask). The defects are fixed by ``seed``: the same set every epoch and run."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        seed: int = 0,
    ) -> None:
        super().__init__(samples, image_size, mean, std)
        self.seed = seed

    def __len__(self) -> int:
        return 2 * len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = len(self.samples)
        x = self.load(self.samples[i % n].path)  # (3, S, S)
        mask = torch.zeros(self.size, self.size)
        if i >= n:
            img, m = synthesize(x.permute(1, 2, 0).numpy(), np.random.default_rng([self.seed, i]))
            x, mask = torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(m).float()
        return {
            "image": (x - self.mean) / self.std,
            "mask": mask,
            "has_mask": torch.tensor(True),
            "label": torch.tensor(int(i >= n)),
            "index": torch.tensor(i),
        }


class SyntheticTrainSet(ImageDataset):
    """Good training images for models that learn from synthetic defects: each item is the
    image with a defect (probability ``defect_prob``) or as it is, its clean version and the
    defect's mask. Defects are Perlin ones drawn afresh each epoch, or, given ``bank`` (triples
    of defective image, mask and clean source from `kdad synth sample`), drawn from the bank.
    Everything is fixed by (seed, epoch, index): resuming replays the same defects."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        seed: int = 0,
        defect_prob: float = 0.5,
        bank: list[tuple[Path, Path, Path]] | None = None,
    ) -> None:
        super().__init__(samples, image_size, mean, std)
        self.seed, self.defect_prob, self.bank, self.epoch = seed, defect_prob, bank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        clean = self.load(self.samples[i].path)  # (3, S, S)
        x, mask = clean, torch.zeros(self.size, self.size)
        if rng.random() < self.defect_prob:
            if self.bank:
                image, mask_path, source = self.bank[rng.integers(len(self.bank))]
                x, clean = self.load(image), self.load(source)
                m = torch.from_numpy(read_mask(mask_path)).float()[None, None]
                mask = (F.interpolate(m, size=(self.size, self.size), mode="bilinear") > 0.5)[0, 0]
            else:
                img, m = synthesize(clean.permute(1, 2, 0).numpy(), rng)
                x, mask = torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(m)
        return {
            "image": (x - self.mean) / self.std,
            "clean": (clean - self.mean) / self.std,
            "mask": mask.float(),
            "label": torch.tensor(int(bool(mask.any()))),
            "index": torch.tensor(i),
        }


def read_bank(folder: str | Path, keep: list[Sample]) -> list[tuple[Path, Path, Path]]:
    """The (image, mask, source) triples listed in ``folder``/synthetic.csv whose source is one
    of ``keep`` (images held out of fitting never enter training through their copies)."""
    folder = Path(folder)
    index = folder / "synthetic.csv"
    if not index.is_file():
        raise KdadError(f"{folder}: no synthetic.csv here; write one with `kdad synth sample`")
    allowed = {s.path.resolve() for s in keep}
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"image", "mask", "source"} <= set(rows[0]):
        raise KdadError(f"{index}: needs columns image, mask, source")
    bank = [
        (folder / r["image"], folder / r["mask"], Path(r["source"]))
        for r in rows
        if Path(r["source"]).resolve() in allowed
    ]
    if not bank:
        raise KdadError(f"{index}: none of its {len(rows)} defects comes from a training image")
    return bank
