"""Each scale's own map of a trained distillation checkpoint on Magnetic Tile's dev half.

Any distiller whose map is its scales' 1 - cos (RD's family, STU-Seg without its head). Image
AUROC per class and pixel AUROC per class for every teacher scale alone and for their sum (the
model's map), to see which scale finds which defect, and of weighted sums: each scale divided
by its mean over the held-out good training images' pixels (the checkpoint's calibration
images, never test images), alone or without the shallowest scale, and the normalised sum
smoothed more (sigma 8 and 16 instead of the model's 4). Pixel AUROC is taken on every 4th
pixel of each row and column: the maps are smooth (Gaussian sigma 4), and a full curve per
scale and class would take minutes each on 2 cores.

    python bench/analyses/mtd_scales.py runs/recipe_s1/checkpoint.pt \
        --out bench/results/mtd_maps/s1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import write_result

import kdad
from kdad.data.layouts import Sample, find_samples, mtd_dev_names, mtd_key
from kdad.metrics import PixelCurve, image_auroc
from kdad.models.layers import GaussianBlur, cosine_distance_map

STEP = 4  # pixel metrics on every STEP-th pixel of each row and column
SIGMAS = (8.0, 16.0)  # more smoothing of the normalised sum, for large diffuse defects


def features(model: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """The teacher's and the student's features for ``x`` as the model's own forward computes
    them (every distiller passes them to ``output``), whatever its student takes as input."""
    got = []
    output = model.output
    model.output = lambda t, s, x: got.append((t, s)) or output(t, s, x)
    try:
        model(x)
    finally:
        del model.output
    return got[0]


@torch.inference_mode()
def scale_maps(det: kdad.Detector, ds: torch.utils.data.Dataset) -> tuple[np.ndarray, ...]:
    """Each scale's unsmoothed 1 - cos map (S, N, H, W), masks on every STEP-th pixel
    (N, h, w) and labels (N,)."""
    model, maps, masks, labels = det.model, [], [], []
    for batch in torch.utils.data.DataLoader(ds, batch_size=16):
        x = batch["image"]  # (B, 3, H, W)
        size = tuple(x.shape[-2:])
        per_scale = [cosine_distance_map(a, b, size) for a, b in zip(*features(model, x))]
        maps.append(torch.stack(per_scale).numpy())  # (S, B, H, W), unsmoothed
        masks.append(batch["mask"][:, ::STEP, ::STEP].numpy() > 0.5)
        labels.append(batch["label"].numpy())
    return np.concatenate(maps, 1), np.concatenate(masks), np.concatenate(labels)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed (..., H, W) maps, taken on every STEP-th pixel."""
    flat = torch.from_numpy(maps.reshape(-1, *maps.shape[-2:]))
    out = GaussianBlur(sigma)(flat).numpy().reshape(maps.shape)
    return out[..., ::STEP, ::STEP]


def by_class(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> dict:
    """Image AUROC (max) and pixel AUROC, pooled and per defect class with the good images."""
    good = labels == 0
    scores = maps.reshape(len(maps), -1).max(1)
    out = {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": PixelCurve.build(maps, masks).auroc(),
    }
    for c in sorted(set(classes[~good])):
        sel = good | (classes == c)
        out[c] = {
            "image_auroc": image_auroc(scores[sel], labels[sel]),
            "pixel_auroc": PixelCurve.build(maps[sel], masks[sel]).auroc(),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a distillation checkpoint trained on Magnetic Tile")
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--out", required=True, help="JSON result")
    args = ap.parse_args()

    det = kdad.load(args.checkpoint, device="cpu")
    dev = mtd_dev_names()
    samples = [s for s in find_samples(args.data, "test", "mtd") if mtd_key(s.path) in dev]
    raw, masks, labels = scale_maps(det, det.dataset(samples))  # (S, N, H, W) unsmoothed
    maps = smooth(raw, det.model.opt.sigma)  # as the model smooths
    classes = np.array([s.path.parent.parent.name.removeprefix("MT_") for s in samples])
    held = [Sample(Path(p), 0) for p in det.checkpoint["holdout"]]
    normal = scale_maps(det, det.dataset(held))[0]  # (S, M, H, W) held-out good images
    scale = normal.reshape(len(normal), -1).mean(1)[:, None, None, None]  # (S, 1, 1, 1)
    weighted = maps / scale
    result = {
        "checkpoint": str(args.checkpoint),
        "half": "dev",
        "images": len(samples),
        "stages": det.model.teacher.stages,
        "per_scale": {
            stage: by_class(m, masks, labels, classes)
            for stage, m in zip(det.model.teacher.stages, maps)
        },
        "sum": by_class(maps.sum(0), masks, labels, classes),
        "normal_means": scale.ravel().tolist(),
        "normalised_sum": by_class(weighted.sum(0), masks, labels, classes),
        "normalised_sum_without_shallowest": by_class(weighted[1:].sum(0), masks, labels, classes),
        **{
            f"normalised_sum_sigma{sigma:g}": by_class(
                smooth((raw / scale).sum(0), sigma), masks, labels, classes
            )
            for sigma in SIGMAS
        },
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
