"""Which disagreement between teacher and student finds Magnetic Tile's defects: one trained RD
checkpoint's features, scored on the dev half of the test set with each per-scale term alone
and summed. Terms: ``cos`` (1 - cos, RD's map), ``mag`` (|log| of the student's over the
teacher's feature norm: what cos ignores, brightness and contrast), ``l2`` (squared distance
of the raw features) and ``pool`` (1 - cos of the features averaged over 3x3 neighbourhoods,
PatchCore's local aggregation). Each scale's term is divided by its mean on the checkpoint's
held-out good training images (as ``scale_norm``), summed over scales, Gaussian-smoothed as the
model does.

    python bench/analyses/map_terms.py runs/recipe_s0/best.pt \
        --out bench/results/mtd_levers/terms_s0.json

On data other than Magnetic Tile, the whole test set; ``--sums`` picks the rows.
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
from common import mtd_half, write_result

from kdad.data.layouts import detect_layout, find_samples, training_samples
from kdad.detector import Detector
from kdad.metrics import PixelCurve, compute_metrics, image_auroc

SUMS = {
    "cos": ("cos",),
    "mag": ("mag",),
    "l2": ("l2",),
    "pool": ("pool",),
    "cos+mag": ("cos", "mag"),
    "cos+l2": ("cos", "l2"),
    "cos+pool": ("cos", "pool"),
}


def terms(t: Tensor, s: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
    """Per-pixel terms of one scale's (B, C, h, w) features, upsampled to (B, *size)."""
    nt, ns = t.norm(dim=1, keepdim=True), s.norm(dim=1, keepdim=True)  # (B, 1, h, w)
    pt, ps = F.avg_pool2d(t, 3, 1, 1), F.avg_pool2d(s, 3, 1, 1)  # (B, C, h, w)
    out = {
        "cos": 1 - F.cosine_similarity(t, s, dim=1)[:, None],
        "mag": (ns.clamp_min(1e-6) / nt.clamp_min(1e-6)).log().abs(),
        "l2": (t - s).pow(2).sum(1, keepdim=True),
        "pool": 1 - F.cosine_similarity(pt, ps, dim=1)[:, None],
    }
    return {k: F.interpolate(v, size=size, mode="bilinear")[:, 0] for k, v in out.items()}


@torch.no_grad()
def scale_terms(
    det: Detector, samples: list, terms_kept: set[str], batch: int = 16
) -> dict[str, list[np.ndarray]]:
    """term -> per scale, maps (N, H, W) of ``samples``; plus masks (N, H, W)."""
    model = det.model.eval()
    ds = det.dataset(samples)
    out: dict[str, list[list[Tensor]]] = {k: [] for k in terms_kept}
    masks = []
    for chunk in DataLoader(ds, batch_size=batch):
        x = chunk["image"]  # (B, 3, H, W)
        masks.append(chunk["mask"])
        t = model.teacher(x)
        s = model.student(t)
        per = [terms(a, b, tuple(x.shape[-2:])) for a, b in zip(t, s)]
        for k in terms_kept:
            out[k].append([p[k] for p in per])
    maps = {k: [torch.cat(col).numpy() for col in zip(*v)] for k, v in out.items()}
    maps["masks"] = [torch.cat(masks).numpy()]
    return maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--sums", nargs="+", choices=list(SUMS), default=list(SUMS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    det = Detector.load(args.checkpoint)
    d = det.cfg.data
    kept = {k for name in args.sums for k in SUMS[name]}
    _, held = training_samples(d)
    good = scale_terms(det, held, kept)
    means = {k: [m.mean() for m in good[k]] for k in kept}
    half = "dev" if detect_layout(Path(d.path)) == "mtd" else "all"
    test = mtd_half(d.path) if half == "dev" else find_samples(d.path, "test", d.layout)
    maps = scale_terms(det, test, kept)
    labels = np.array([s.label for s in test])
    defect = np.array([s.defect for s in test])
    masks = maps["masks"][0] > 0.5
    rows = {}
    for name in args.sums:
        parts = SUMS[name]
        amap = sum(m / mu for k in parts for m, mu in zip(maps[k], means[k]))  # (N, H, W)
        amap = det.model.blur(torch.from_numpy(np.ascontiguousarray(amap))).numpy()
        scores = amap.reshape(len(amap), -1).max(1)
        row = {"metrics": compute_metrics(scores, labels, amap, masks), "per_class": {}}
        for c in sorted(set(defect[labels == 1])):
            sel = (defect == c) | (labels == 0)
            row["per_class"][c] = {
                "image_auroc": image_auroc(scores[sel], labels[sel]),
                "pixel_auroc": PixelCurve.build(amap[sel], masks[sel]).auroc(),
            }
        rows[name] = row
        m = row["metrics"]
        per = " ".join(
            f"{c} {100 * v['image_auroc']:.0f}/{100 * v['pixel_auroc']:.0f}"
            for c, v in row["per_class"].items()
        )
        print(
            f"{name:8s} image {100 * m['image_auroc']:.1f} pixel {100 * m['pixel_auroc']:.1f} "
            f"AUPRO {100 * m['aupro']:.1f} AP {100 * m['pixel_ap']:.1f} | {per}"
        )
    settings = {"checkpoint": str(args.checkpoint), "half": half, "held_out_good": len(held)}
    write_result(args.out, {"benchmark": "map_terms", "settings": settings, "terms": rows})


if __name__ == "__main__":
    main()
