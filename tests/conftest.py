"""Generated tiny datasets in every layout kdad reads, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 64


def texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A good part: regular stripes with a random phase and mild noise, uint8 (H, W, 3)."""
    y, x = np.mgrid[:size, :size]
    phase = rng.uniform(0, 2 * np.pi)
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (x + y) / 8 + phase) + rng.normal(0, 0.03, (size, size))
    return (np.clip(img, 0, 1)[:, :, None].repeat(3, 2) * 255).astype(np.uint8)


def defect(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A defective part: the texture with a flat dark square; returns image and uint8 mask."""
    img = texture(rng, size)
    mask = np.zeros((size, size), np.uint8)
    s = size // 4
    r, c = rng.integers(0, size - s, 2)
    img[r : r + s, c : c + s] = 20
    mask[r : r + s, c : c + s] = 255
    return img, mask


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(
    root: Path,
    n_train: int = 8,
    n_good: int = 4,
    n_bad: int = 4,
    mask_suffix: str = "_mask",
    seed: int = 0,
) -> Path:
    """root/{train/good, test/good, test/scratch, ground_truth/scratch} with PNGs."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        save(root / "train" / "good" / f"{i:03d}.png", texture(rng))
    for i in range(n_good):
        save(root / "test" / "good" / f"{i:03d}.png", texture(rng))
    for i in range(n_bad):
        img, mask = defect(rng)
        save(root / "test" / "scratch" / f"{i:03d}.png", img)
        save(root / "ground_truth" / "scratch" / f"{i:03d}{mask_suffix}.png", mask)
    return root


def make_folder(root: Path, n_good: int = 6, n_bad: int = 3, seed: int = 1) -> Path:
    """root/{good, defect, mask}: the folder layout."""
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        save(root / "good" / f"g{i}.jpg", texture(rng))
    for i in range(n_bad):
        img, mask = defect(rng)
        save(root / "defect" / f"d{i}.png", img)
        save(root / "mask" / f"d{i}.png", mask)
    return root


def make_mtd(root: Path, n_test_good: int = 3, n_bad: int = 2) -> Path:
    """Magnetic Tile's layout holding every DifferNet training name (tiny gray JPEGs); the
    first good and the first defective test image have names of the shipped dev half."""
    from kdad.data.layouts import mtd_dev_names, mtd_train_names

    rng = np.random.default_rng(2)
    dev = sorted(mtd_dev_names())
    free = root / "MT_Free" / "Imgs"
    test = [f"exp9_num_{i}.jpg" for i in range(n_test_good)]
    test[0] = next(n for n in dev if n.startswith("MT_Free/")).split("/")[1]
    for name in sorted(mtd_train_names()) + test:
        save(free / name, texture(rng, 16)[:, :, 0])
        save(free / name.replace(".jpg", ".png"), np.zeros((16, 16), np.uint8))
    bad = [f"exp9_num_b{i}.jpg" for i in range(n_bad)]
    bad[0] = next(n for n in dev if n.startswith("MT_Blowhole/")).split("/")[1]
    for name in bad:
        img, mask = defect(rng, 16)
        save(root / "MT_Blowhole" / "Imgs" / name, img[:, :, 0])
        save(root / "MT_Blowhole" / "Imgs" / name.replace(".jpg", ".png"), mask)
    return root


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "mvtec")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models' ONNX graphs (engine/runtime.py) kept in the session's own folder, not ~/.cache."""
    path = tmp_path_factory.mktemp("kdad_cache")
    os.environ["KDAD_CACHE"] = str(path)
    return path
