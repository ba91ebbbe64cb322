"""Maps that need no training, from the teacher's features alone: each position's feature
against its own image's median feature ("self"), or against the mean feature at that position
over the good training images ("position", PaDiM's reference without its covariance); 1 - cos,
per teacher scale, upsampled, smoothed as the model's map, standardised over the held-out good
images' pixels, alone and added with weights to a trained checkpoint's map (itself standardised
so), of any model. "self" sees a defect that differs from the rest of its own part, whatever
other parts look like, and marks a part whose normal look differs from place to place;
"position" suits parts that sit in the same place in every image. Pixel metrics only: the
image score stays the model's. Magnetic Tile: one half (``--half``); another dataset: its whole
test set.

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
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).parent))  # bench/analyses/, for dest_scores
from common import write_result
from dest_scores import KEYS, rescored_samples, z

from kdad.data.layouts import Sample, training_samples
from kdad.detector import Detector
from kdad.metrics import compute_metrics
from kdad.models.layers import GaussianBlur
from kdad.models.seghead import self_distance

WEIGHTS = (0.25, 0.5, 1.0)


@torch.no_grad()
def position_means(det: Detector, samples: list[Sample], batch: int = 16) -> list[Tensor]:
    """Per teacher scale, the mean feature at each position over ``samples``: (1, C, h, w)."""
    sums: list[Tensor] = []
    n = 0
    for chunk in DataLoader(det.dataset(samples), batch_size=batch):
        feats = [f.sum(0, keepdim=True) for f in det.model.teacher(chunk["image"])]
        sums = [a + b for a, b in zip(sums, feats)] if sums else feats
        n += len(chunk["image"])
    return [s / n for s in sums]


def smoothed(d: Tensor, size: tuple[int, int]) -> Tensor:
    """A distance map (B, 1, h, w) at ``size``, smoothed by the model's sigma (4 px): (B, H, W)."""
    up = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
    return GaussianBlur(4.0)(up[:, 0])


@torch.no_grad()
def maps_of(
    det: Detector, samples: list[Sample], means: list[Tensor], batch: int = 16
) -> dict[str, np.ndarray]:
    """The model's map (N, H, W) and score (N,), the masks (N, H, W), and per teacher scale
    the distance of each position's feature to its image's median feature, self (N, S, H, W),
    and to the mean feature at its position, position (N, S, H, W)."""
    model = det.model.eval()
    out: dict[str, list] = {"map": [], "score": [], "masks": [], "self": [], "position": []}
    for chunk in DataLoader(det.dataset(samples), batch_size=batch):
        x = chunk["image"]  # (B, 3, H, W)
        feats = model.teacher(x)  # per scale (B, C, h, w), handed to the model as well
        o = model(x, feats)
        out["map"].append(o.anomaly_map)
        out["score"].append(o.score)
        out["masks"].append(chunk["mask"] > 0.5)
        size = tuple(x.shape[-2:])
        selfs = [smoothed(self_distance(f), size) for f in feats]
        positions = [
            smoothed(1 - F.cosine_similarity(f, m.expand_as(f), dim=1)[:, None], size)
            for f, m in zip(feats, means)
        ]
        out["self"].append(torch.stack(selfs, 1))
        out["position"].append(torch.stack(positions, 1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--half", choices=("dev", "final"), default="dev")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    det = Detector.load(args.checkpoint)
    fit, held = training_samples(det.cfg.data)
    test = rescored_samples(det, args.half)
    labels = np.array([s.label for s in test])
    means = position_means(det, fit)
    good, o = maps_of(det, held, means), maps_of(det, test, means)
    model_map = z(o["map"], good["map"])
    maps = {"the model's map": model_map}
    for kind, prefix in (("self", ""), ("position", "position ")):
        for s in range(o[kind].shape[1]):
            ref = z(o[kind][:, s], good[kind][:, s])
            maps[f"{prefix}scale {s} alone"] = ref
            maps.update(
                {f"the model's + {w:g} {prefix}scale {s}": model_map + w * ref for w in WEIGHTS}
            )
    result = {}
    for name, m in maps.items():
        met = compute_metrics(o["score"], labels, m, o["masks"])
        result[name] = {k: met[k] for k in KEYS}
        print(f"{name:37s} " + " ".join(f"{k} {100 * met[k]:.1f}" for k in KEYS), flush=True)
    settings = {"checkpoint": str(args.checkpoint), "half": args.half}
    write_result(args.out, {"benchmark": "self_reference", "settings": settings, "maps": result})


if __name__ == "__main__":
    main()
