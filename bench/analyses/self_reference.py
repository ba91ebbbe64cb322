"""A map that needs no training: each position's teacher feature against its own image's median
feature (1 - cos, per teacher scale, upsampled, smoothed as the model's map), standardised over
the held-out good images' pixels, alone and added with weights to a trained checkpoint's map
(itself standardised so), of any model. A defect that differs from the rest of its own part
shows in it, whatever the other parts look like; a part whose normal structure differs from
place to place shows there too, in good images as well. Pixel metrics only: the image score
stays the model's. Magnetic Tile: one half (``--half``); another dataset: its whole test set.

    python bench/analyses/self_reference.py runs/head_lr/split/mtd-s0/first/best.pt \
        --half dev --out bench/results/dest_default/self_reference/mtd_s0_dev.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).parent))  # bench/analyses/, for dest_scores
from common import write_result
from dest_scores import rescored_samples, z

from kdad.data.layouts import Sample, training_samples
from kdad.detector import Detector
from kdad.metrics import compute_metrics
from kdad.models.layers import GaussianBlur

KEYS = ("pixel_auroc", "pixel_ap", "aupro", "iap")
WEIGHTS = (0.25, 0.5, 1.0)


@torch.no_grad()
def maps_of(det: Detector, samples: list[Sample], batch: int = 16) -> dict[str, np.ndarray]:
    """The model's map (N, H, W) and score (N,), the masks (N, H, W), and per teacher scale
    1 - cos between each position's feature and its image's median feature, at the input's
    size, smoothed by the model's sigma (4 px): self (N, S, H, W)."""
    model = det.model.eval()
    out: dict[str, list] = {"map": [], "score": [], "masks": [], "self": []}
    for chunk in DataLoader(det.dataset(samples), batch_size=batch):
        x = chunk["image"]  # (B, 3, H, W)
        o = model(x)
        out["map"].append(o.anomaly_map)
        out["score"].append(o.score)
        out["masks"].append(chunk["mask"] > 0.5)
        scales = []
        for f in det.model.teacher(x):  # (B, C, h, w)
            median = f.flatten(2).median(2).values[..., None, None]  # (B, C, 1, 1)
            d = 1 - F.cosine_similarity(f, median.expand_as(f), dim=1)  # (B, h, w)
            up = F.interpolate(d[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            scales.append(GaussianBlur(4.0)(up[:, 0]))
        out["self"].append(torch.stack(scales, 1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--half", choices=("dev", "final"), default="dev")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    det = Detector.load(args.checkpoint)
    _, held = training_samples(det.cfg.data)
    test = rescored_samples(det, args.half)
    labels = np.array([s.label for s in test])
    good, o = maps_of(det, held), maps_of(det, test)
    model_map = z(o["map"], good["map"])
    maps = {"the model's map": model_map}
    for s in range(o["self"].shape[1]):
        ref = z(o["self"][:, s], good["self"][:, s])
        maps[f"scale {s} alone"] = ref
        maps.update({f"the model's + {w:g} scale {s}": model_map + w * ref for w in WEIGHTS})
    result = {}
    for name, m in maps.items():
        met = compute_metrics(o["score"], labels, m, o["masks"])
        result[name] = {k: met[k] for k in KEYS}
        print(f"{name:28s} " + " ".join(f"{k} {100 * met[k]:.1f}" for k in KEYS), flush=True)
    settings = {"checkpoint": str(args.checkpoint), "half": args.half}
    write_result(args.out, {"benchmark": "self_reference", "settings": settings, "maps": result})


if __name__ == "__main__":
    main()
