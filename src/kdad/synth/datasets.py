"""Training and validation images with synthetic defects: Perlin ones drawn by (seed, epoch,
index), or a bank painted by `kdad synth sample`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from kdad.data import augment as views
from kdad.data.dataset import ImageDataset, TrainSet, resize_mask
from kdad.data.io import read_mask
from kdad.data.layouts import Sample
from kdad.synth.perlin import synthesize


class SyntheticValidationSet(ImageDataset):
    """Held-out good images, each once as it is (label 0) and ``draws`` times with a synthetic
    Perlin defect (label 1, its mask). The defects are fixed by ``seed``: the same set every
    epoch and run."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        seed: int = 0,
        draws: int = 1,
    ) -> None:
        super().__init__(samples, image_size, mean, std)
        self.seed, self.draws = seed, draws

    def __len__(self) -> int:
        return (1 + self.draws) * len(self.samples)

    def good(self) -> Subset:
        """The held-out good images as they are (the first ``len(samples)`` items)."""
        return Subset(self, range(len(self.samples)))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = len(self.samples)
        x = self.load(self.samples[i % n].path)  # (3, H, W)
        mask = torch.zeros(self.size)
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


class SyntheticTrainSet(TrainSet):
    """Good training images for models that learn from synthetic defects: each item is the
    image with a defect (probability ``defect_prob``) or as it is, its clean version and the
    defect's mask, all in one random view of ``augment``. Defects are Perlin ones drawn afresh
    each epoch, or, given ``bank`` (triples of defective image, mask and clean source from `kdad
    synth sample`), drawn from the bank with probability ``bank_share``, else Perlin ones. A
    Perlin mask's threshold is drawn in ``thresholds`` (lo, hi): 0.5 alone gives DRAEM's
    defects, 3-8% of the image; down to 0.1, up to 37%, as wide as real defects come.
    Given ``wide`` (lo, hi), epochs of the training phase ``wide_phase`` (a second head's) draw
    their Perlin masks' thresholds in ``wide`` instead, and take no bank defects. Everything is
    fixed by (seed, epoch, index): resuming replays the same defects. Items also carry
    ``clean_index``, the training image that is their clean version (a bank defect's source),
    by which the teacher's features of it can be looked up."""

    def __init__(
        self,
        samples: list[Sample],
        image_size: int | tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        seed: int = 0,
        augment: list[str] | tuple[str, ...] = (),
        defect_prob: float = 0.5,
        bank: list[tuple[Path, Path, Path]] | None = None,
        bank_share: float = 1.0,
        cache_bytes: float = 0.0,
        thresholds: tuple[float, float] = (0.5, 0.5),
        wide: tuple[float, float] | None = None,
        wide_phase: str = "wide",
    ) -> None:
        super().__init__(samples, image_size, mean, std, seed, augment, cache_bytes)
        self.defect_prob, self.bank, self.bank_share = defect_prob, bank, bank_share
        self.thresholds, self.wide, self.wide_phase = thresholds, wide, wide_phase
        index = {s.path.resolve(): i for i, s in enumerate(samples)}
        self.sources = [index[source.resolve()] for *_, source in bank or []]  # bank's clean

    @classmethod
    def around(
        cls,
        images: TrainSet,
        defect_prob: float,
        bank: list[tuple[Path, Path, Path]] | None,
        bank_share: float = 1.0,
        thresholds: tuple[float, float] = (0.5, 0.5),
        wide: tuple[float, float] | None = None,
    ) -> SyntheticTrainSet:
        """The training images ``images``, now carrying synthetic defects."""
        norm = (tuple(images.mean.flatten().tolist()), tuple(images.std.flatten().tolist()))
        size, seed, augment = images.size, images.seed, images.augment
        return cls(
            images.samples,
            size,
            *norm,
            seed,
            augment,
            defect_prob,
            bank,
            bank_share,
            images.cache_bytes,
            thresholds,
            wide,
        )

    def teacher_inputs(self) -> tuple[TrainSet, str] | None:
        """The clean training images, indexed by ``clean_index``, when they come in no views."""
        if self.augment:
            return None
        norm = (tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))
        plain = TrainSet(self.samples, self.size, *norm, self.seed, cache_bytes=self.cache_bytes)
        plain.cached = self.cached  # one store of decoded images for both
        return plain, "clean_index"

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        j = i  # the clean version's index
        clean = self.image(i)  # (3, H, W)
        x, mask = clean, torch.zeros(self.size)
        wide = self.wide is not None and self.phase == self.wide_phase
        if rng.random() < self.defect_prob:
            if not wide and self.bank and rng.random() < self.bank_share:
                k = rng.integers(len(self.bank))
                (image, mask_path, _), j = self.bank[k], self.sources[k]
                x, clean = self.load(image), self.image(j)
                mask = resize_mask(torch.from_numpy(read_mask(mask_path)), self.size)
            else:
                lo, hi = self.wide if wide else self.thresholds
                threshold = rng.uniform(lo, hi) if hi > lo else lo
                img, m = synthesize(clean.permute(1, 2, 0).numpy(), rng, threshold=threshold)
                x, mask = torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(m)
        view = self.view(i)
        x, clean, mask = (views.apply(t, view) for t in (x, clean, mask.float()))
        return {
            "image": (x - self.mean) / self.std,
            "clean": (clean - self.mean) / self.std,
            "mask": mask,
            "label": torch.tensor(int(bool(mask.any()))),
            "index": torch.tensor(i),
            "clean_index": torch.tensor(j),
        }
