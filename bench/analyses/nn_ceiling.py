"""What a frozen teacher's features hold on Magnetic Tile: each test patch scored by its distance
to the nearest of a random sample of training patches (PatchCore-style: 3x3 average pooling,
stages upsampled to the shallowest one's grid and concatenated, map smoothed with sigma 4,
image score its maximum). No student: a reference for what the features let a student find, at
one teacher, stage set and input size; not a strict bound (a trained head can pass it).

    python bench/analyses/nn_ceiling.py --backbone efficientnet_lite0 --stages stage3 stage5 \
        --size 256 \
        --out bench/results/mtd_levers/nn_lite0_s35_256.json

Dev half by default (where settings are chosen); ``--half final`` to compare with a model's
reported numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import mtd_half, write_result

from kdad.backbones import get_spec
from kdad.data.dataset import ImageDataset
from kdad.data.layouts import find_samples
from kdad.metrics import compute_metrics, per_class_image_auroc
from kdad.models.layers import GaussianBlur
from kdad.models.teacher import Teacher


@torch.no_grad()
def patches(teacher: Teacher, ds: ImageDataset, batch: int = 16) -> tuple[Tensor, Tensor]:
    """(N, h, w, C) pooled, concatenated patch features of ``ds``; (N, H, W) masks."""
    feats, masks = [], []
    for chunk in DataLoader(ds, batch_size=batch):
        masks.append(chunk["mask"])
        fs = [F.avg_pool2d(f, 3, 1, 1) for f in teacher(chunk["image"])]
        hw = fs[0].shape[-2:]
        f = torch.cat([F.interpolate(f, size=hw, mode="bilinear") for f in fs], 1)  # (B, C, h, w)
        feats.append(f.permute(0, 2, 3, 1).contiguous())
    return torch.cat(feats), torch.cat(masks)


@torch.no_grad()
def nearest(query: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """(Q,) distance of each (Q, C) query row to its nearest (M, C) bank row."""
    return torch.cat([torch.cdist(q, bank).amin(1) for q in query.split(chunk)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--stages", nargs="+", default=["stage3", "stage5"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--bank-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--half", choices=("dev", "final"), default="dev")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    spec = get_spec(args.backbone)
    teacher = Teacher(args.backbone, args.stages, pretrained=True, weights=None)
    train = find_samples(args.data, "train", "mtd")
    test = mtd_half(args.data, args.half)
    good, _ = patches(teacher, ImageDataset(train, args.size, spec.mean, spec.std))
    good = good.flatten(0, 2)  # (N h w, C)
    bank = good[torch.randperm(len(good))[: int(args.bank_fraction * len(good))]]
    feats, masks = patches(teacher, ImageDataset(test, args.size, spec.mean, spec.std))
    n, h, w, _ = feats.shape
    dist = nearest(feats.flatten(0, 2), bank).view(n, 1, h, w)
    amap = GaussianBlur(4.0)(F.interpolate(dist, size=masks.shape[-2:], mode="bilinear")[:, 0])
    amap = amap.numpy()  # (N, H, W)
    scores = amap.reshape(n, -1).max(1)
    labels = np.array([s.label for s in test])
    defect = np.array([s.defect for s in test])
    per = per_class_image_auroc(scores, labels, defect)
    m = compute_metrics(scores, labels, amap, masks.numpy() > 0.5)
    cells = [f"{k} {100 * m[k]:.1f}" for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")]
    cells += [f"{c} {100 * v:.0f}" for c, v in per.items()]
    print(f"{args.backbone} {'+'.join(args.stages)} {args.size}: " + " ".join(cells))
    settings = vars(args) | {"bank": len(bank), "s": time.perf_counter() - start}
    result = {"benchmark": "nn_ceiling", "settings": settings, "metrics": m, "per_class": per}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
