"""What predict writes: a heatmap overlay per image and a CSV of scores."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image


def upsample_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (S, S) anomaly map resized bilinearly to the original (height, width)."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Jet-coloured map over the image (H, W, 3) in [0, 1], at the image's resolution.

    The map is scaled to its own range: it shows where in this image, not how anomalous the
    image is (its score says that).
    """
    h, w = image.shape[:2]
    m = upsample_map(amap, h, w)
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    color = colormaps["jet"](m)[:, :, :3]  # (H, W, 3)
    blend = (1 - alpha) * image + alpha * color
    return Image.fromarray((blend * 255).round().astype(np.uint8))


def unique_name(path: Path, used: set[str]) -> str:
    """A file stem for ``path`` not yet in ``used`` (images of the same name in two folders)."""
    stem, k = path.stem, 1
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


class PredictionWriter:
    """Streams one CSV row per image: path, score, heatmap file, error if unreadable."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "heatmaps").mkdir(exist_ok=True)
        self.out = out
        self._file = open(out / "predictions.csv", "w", newline="")  # noqa: SIM115 (closed by close())
        self._csv = csv.writer(self._file)
        self._csv.writerow(["path", "score", "heatmap", "error"])
        self._used: set[str] = set()

    def write(self, path: Path, score: float, image: np.ndarray, amap: np.ndarray) -> None:
        name = f"heatmaps/{unique_name(path, self._used)}.png"
        heatmap_overlay(image, amap).save(self.out / name)
        self._csv.writerow([str(path), f"{score:.6g}", name, ""])

    def write_error(self, path: Path, error: str) -> None:
        self._csv.writerow([str(path), "", "", error])

    def close(self) -> None:
        self._file.close()
