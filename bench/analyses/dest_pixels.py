"""Where DeST-DDPM's pixel metrics on Magnetic Tile are lost: one checkpoint, one half. For the
model's map and the head's own: the pixel AUROC and AP of each class's defect pixels against the
normal pixels of the whole half, and the AUROC of each class's defect pixels against the normal
pixels of each group of images (good ones, each defect class's), which tells which normal pixels
outrank which defects. Then the pooled pixel metrics of the map rule varied after training: the
head's map smoothed by a Gaussian of sigma 0-12 pixels and the student's map weighted 1 or 2,
each standardised over the held-out good images' pixels and summed (the model's rule: sigma 0,
weight 1); and the model's map less each image's own median or lower quartile.

    python bench/analyses/dest_pixels.py runs/dest_default/mtd_dest_perlin-s0/best.pt \
        --half final --out bench/results/dest_default/dest_pixels_perlin_s0.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).parent))  # bench/analyses/, for dest_scores
from common import checkpoint_parser, mtd_half, write_result
from dest_scores import outputs, student_map, z

from kdad.data.layouts import training_samples
from kdad.detector import Detector
from kdad.metrics import compute_metrics
from kdad.models.layers import GaussianBlur

SAMPLE = 400_000  # pixels drawn from a group for the pairwise AUROCs (seeded)


def pairwise(amap: np.ndarray, masks: np.ndarray, defect: np.ndarray) -> dict[str, dict]:
    """Per class: AUROC and AP of its defect pixels against every normal pixel of the half, and
    AUROC against the normal pixels of each group of images."""
    rng = np.random.default_rng(0)

    def draw(v: np.ndarray) -> np.ndarray:
        return v if v.size <= SAMPLE else rng.choice(v, SAMPLE, replace=False)

    groups = sorted(set(defect))
    normal = {g: amap[defect == g][~masks[defect == g]] for g in groups}
    every = draw(np.concatenate(list(normal.values())))
    out = {}
    for c in groups:
        pos = amap[defect == c][masks[defect == c]]
        if pos.size == 0:  # the good images
            continue
        pos = draw(pos)

        def auroc(neg: np.ndarray, pos: np.ndarray = pos) -> float:
            y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
            return float(roc_auc_score(y, np.r_[pos, neg]))

        y = np.r_[np.ones(pos.size), np.zeros(every.size)]
        out[c] = {
            "share_of_defect_pixels": float(masks[defect == c].sum() / masks.sum()),
            "pixel_auroc": auroc(every),
            "pixel_ap": float(average_precision_score(y, np.r_[pos, every])),
            "auroc_against_normal_of": {g: auroc(draw(normal[g])) for g in groups},
        }
    return out


def main() -> None:
    ap = checkpoint_parser(__doc__)
    ap.add_argument("--half", choices=("dev", "final"), default="dev")
    args = ap.parse_args()
    det = Detector.load(args.checkpoint)
    model = det.model
    test = mtd_half(det.cfg.data.path, args.half)
    o = outputs(det, test)
    _, held = training_samples(det.cfg.data)
    good = outputs(det, held)
    labels = np.array([s.label for s in test])
    defect = np.array([s.defect for s in test])
    result: dict = {"per_class": {}, "map_rule": {}}
    for name, key in (("model", "model_map"), ("head", "head")):
        result["per_class"][name] = pairwise(o[key], o["masks"], defect)
        for c, v in result["per_class"][name].items():
            against = " ".join(f"{100 * a:.1f}" for a in v["auroc_against_normal_of"].values())
            print(
                f"{name} {c:9s} AUROC {100 * v['pixel_auroc']:.1f} AP {100 * v['pixel_ap']:.1f}"
                f" against each group's normal pixels {against}"
            )

    means = [good["cos"][i].mean() for i in model.map_scales]

    def student(out: dict) -> np.ndarray:
        return student_map([out["cos"][i] for i in model.map_scales], means)

    sz = z(student(o), student(good))
    for sigma in (0, 4, 8, 12):
        smooth = GaussianBlur(float(sigma)) if sigma else None

        def head(out: dict, smooth: GaussianBlur | None = smooth) -> np.ndarray:
            return smooth(torch.from_numpy(out["head"])).numpy() if smooth else out["head"]

        hz = z(head(o), head(good))
        for weight in (1.0, 2.0):
            m = compute_metrics(o["model_score"], labels, hz + weight * sz, o["masks"])
            row = {k: m[k] for k in ("pixel_auroc", "pixel_ap", "aupro", "iap")}
            result["map_rule"][f"head smoothed {sigma}, student weight {weight:g}"] = row
            print(
                f"head sigma {sigma:2d} student weight {weight:g} "
                + " ".join(f"{k} {100 * v:.1f}" for k, v in row.items())
            )
    for q in (25, 50):  # each image's own offset removed
        amap = o["model_map"]
        amap = amap - np.percentile(amap.reshape(len(amap), -1), q, axis=1)[:, None, None]
        m = compute_metrics(o["model_score"], labels, amap, o["masks"])
        row = {k: m[k] for k in ("pixel_auroc", "pixel_ap", "aupro", "iap")}
        result["map_rule"][f"the model's map less each image's percentile {q}"] = row
        print(f"less percentile {q} " + " ".join(f"{k} {100 * v:.1f}" for k, v in row.items()))
    settings = {"checkpoint": str(args.checkpoint), "half": args.half, "held_out_good": len(held)}
    write_result(args.out, {"benchmark": "dest_pixels", "settings": settings, **result})


if __name__ == "__main__":
    main()
