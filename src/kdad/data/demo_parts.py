"""Generated parts for ``kdad demo``: a small inspection task with no data of one's own.

Each part is a round machined washer on a dark background, seen from above: brushed metal
(streaks along one direction), a bore in the middle, a soft light falloff, and a few pixels of
placement jitter and brightness change from part to part. Defective parts carry one of three
defects, with its pixel mask: a ``scratch`` (a thin dark line across the metal), a ``dent`` (a
dark or bright blotch) and a ``chip`` (a bite out of the outer rim). Written in MVTec AD's layout
so that every kdad verb reads it as it reads a user's folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

DEFECTS = ("scratch", "dent", "chip")


def washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A good part (size, size) in [0, 1] and its metal's mask (size, size) bool."""
    y, x = np.mgrid[:size, :size].astype(np.float64)
    cy, cx = size / 2 + rng.normal(0, size * 0.01, 2)
    r = np.hypot(y - cy, x - cx)
    outer, inner = size * 0.42, size * 0.16
    metal = (r <= outer) & (r >= inner)
    streaks = ndimage.gaussian_filter1d(rng.normal(0, 1, (size, size)), size / 8, axis=1)
    streaks /= streaks.std()
    light = 0.62 + rng.normal(0, 0.02) - 0.12 * ((y - cy) / size + (x - cx) / size)
    img = np.where(metal, light + 0.05 * streaks, 0.08)
    img += rng.normal(0, 0.01, (size, size))
    edge = ndimage.gaussian_filter(metal.astype(np.float64), 0.8)  # the rims, anti-aliased
    img = 0.08 + (img - 0.08) * np.clip(edge * 1.5, 0, 1)
    return np.clip(img, 0, 1), metal


def add_defect(
    rng: np.random.Generator, img: np.ndarray, metal: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with one defect of ``kind`` on its metal, and the defect's mask (H, W) bool."""
    size = img.shape[0]
    y, x = np.mgrid[:size, :size].astype(np.float64)
    ys, xs = np.nonzero(ndimage.binary_erosion(metal, iterations=max(1, size // 32)))
    k = rng.integers(len(ys))
    cy, cx = ys[k], xs[k]
    out = img.copy()
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.3) * size
        along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= max(1.0, size / 128)) & metal
        out[mask] -= 0.3
    elif kind == "dent":
        radius = rng.uniform(0.03, 0.06) * size
        mask = (
            np.hypot((y - cy) / radius, (x - cx) / (radius * rng.uniform(0.6, 1.4))) <= 1
        ) & metal
        out[mask] += rng.choice([-0.3, 0.3])
    elif kind == "chip":
        angle = rng.uniform(0, 2 * np.pi)
        c = size / 2 + 0.42 * size * np.array([np.sin(angle), np.cos(angle)])
        mask = (np.hypot(y - c[0], x - c[1]) <= rng.uniform(0.04, 0.07) * size) & metal
        out[mask] = 0.08
    else:
        raise ValueError(f"unknown defect {kind!r}; one of {DEFECTS}")
    return np.clip(out, 0, 1), mask


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((arr * 255).round().astype(np.uint8)).save(path)


def write_demo_set(
    root: str | Path, n_train: int = 80, n_good: int = 15, n_bad: int = 5, size: int = 128,
    seed: int = 0,
) -> Path:  # fmt: skip
    """``root``/{train/good, test/good, test/<defect>, ground_truth/<defect>}: ``n_train`` good
    parts to train on, ``n_good`` good ones and ``n_bad`` of each defect to test, as PNGs."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", washer(rng, size)[0])
    for i in range(n_good):
        _save(root / "test" / "good" / f"{i:03d}.png", washer(rng, size)[0])
    for kind in DEFECTS:
        for i in range(n_bad):
            img, mask = add_defect(rng, *washer(rng, size), kind)
            _save(root / "test" / kind / f"{i:03d}.png", img)
            _save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.float64))
    return root
