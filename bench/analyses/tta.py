"""Test-time flips on Magnetic Tile: one trained checkpoint scores the dev half of the test set
on the image as given and on its flips (each map flipped back), and on the mean of those maps.
DifferNet scores a tile by its mean over transformed copies; a flipped tile is still a good
tile, so averaging should lower the noise of good tiles' maps more than the defects' signal.

    python bench/analyses/tta.py runs/recipe_s0/best.pt --out bench/results/mtd_levers/tta_s0.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import checkpoint_parser, mtd_half, write_result

from kdad.detector import Detector
from kdad.metrics import compute_metrics, per_class_image_auroc

FLIPS: dict[str, tuple[int, ...]] = {"none": (), "h": (-1,), "v": (-2,), "hv": (-2, -1)}
MEANS = {"none": ("none",), "h+v": ("none", "h", "v"), "all": tuple(FLIPS)}


@torch.no_grad()
def flipped_maps(det: Detector, samples: list, batch: int = 16) -> tuple[dict, np.ndarray]:
    """flip -> (N, H, W) maps of ``samples`` computed on the flipped image and flipped back;
    and the (N, H, W) masks."""
    model = det.model.eval()
    ds = det.dataset(samples)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in FLIPS}
    masks = []
    for chunk in DataLoader(ds, batch_size=batch):
        x = chunk["image"]  # (B, 3, H, W)
        masks.append(chunk["mask"])
        for name, dims in FLIPS.items():
            xf = x.flip(dims) if dims else x
            amap = model(xf).anomaly_map  # (B, H, W)
            out[name].append(amap.flip(dims) if dims else amap)
    return {k: torch.cat(v).numpy() for k, v in out.items()}, torch.cat(masks).numpy() > 0.5


def main() -> None:
    args = checkpoint_parser(__doc__).parse_args()
    det = Detector.load(args.checkpoint)
    test = mtd_half(det.cfg.data.path)
    maps, masks = flipped_maps(det, test)
    labels = np.array([s.label for s in test])
    defect = np.array([s.defect for s in test])
    rows = {}
    for name, parts in MEANS.items():
        amap = np.mean([maps[k] for k in parts], axis=0)  # (N, H, W)
        scores = amap.reshape(len(amap), -1).max(1)
        per = per_class_image_auroc(scores, labels, defect)
        rows[name] = {"metrics": compute_metrics(scores, labels, amap, masks), "per_class": per}
        m = rows[name]["metrics"]
        print(
            f"{name:5s} image {100 * m['image_auroc']:.1f} pixel {100 * m['pixel_auroc']:.1f} "
            f"AUPRO {100 * m['aupro']:.1f} AP {100 * m['pixel_ap']:.1f} | "
            + " ".join(f"{c} {100 * v:.0f}" for c, v in per.items())
        )
    flips = {k: list(v) for k, v in MEANS.items()}
    settings = {"checkpoint": str(args.checkpoint), "half": "dev", "flips": flips}
    write_result(args.out, {"benchmark": "tta", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
