"""How a trained distiller's map is made, swept without retraining: which scales are summed and
how each is normalised, the Gaussian smoothing, and the image score (the map's max, or the mean
of its top pixels).

Each checkpoint's per-scale 1 - cos maps are computed once on the test set and on its held-out
good training images, then every combination is scored. Normalisation, from the held-out good
images only: ``mean`` divides each scale by its mean there (the model's ``scale_norm``), ``z``
subtracts that mean and divides by the standard deviation.
On Magnetic Tile, the dev half (settings are chosen there) and the final half; elsewhere the
whole test set.

    python bench/analyses/map_sweep.py runs/default/mtd_default-s0/best.pt \
        --out bench/results/map_sweep/mtd_s0.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import write_result

from kdad.data.layouts import (
    declared_subsets,
    detect_layout,
    find_samples,
    training_samples,
)
from kdad.detector import Detector
from kdad.metrics import compute_metrics, per_class_image_auroc
from kdad.models.distill import scale_maps
from kdad.models.layers import GaussianBlur

SIGMAS = (2.0, 4.0, 6.0, 8.0)
TOPS = (0.0, 0.001)  # 0: the max; else the mean of this share of the top pixels


@torch.inference_mode()
def raw_scale_maps(det: Detector, samples: list) -> np.ndarray:
    """(N, S, H, W) float32: each scale's 1 - cos map, unweighted."""
    model = det.model
    out = []
    for batch in DataLoader(det.dataset(samples), batch_size=16):
        x = batch["image"]
        maps = scale_maps(model.teacher(x), model.student(x), tuple(x.shape[-2:]))
        out.append(torch.stack(maps, 1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    det = Detector.load(args.checkpoint, "cpu")
    d = det.cfg.data
    layout = detect_layout(Path(d.path)) if d.layout == "auto" else d.layout
    samples = find_samples(
        d.path, "test", layout, d.category, d.normal_dir, d.abnormal_dir, d.mask_dir
    )
    d = replace(d, layout=layout)
    good = raw_scale_maps(det, training_samples(d)[1])  # (M, S, H, W) held-out good images
    mu, sd = good.mean((0, 2, 3)), good.std((0, 2, 3))  # (S,)
    raw = raw_scale_maps(det, samples)  # (N, S, H, W)
    norms = {
        "mean": lambda idx: (raw[:, idx] / mu[idx, None, None]).sum(1),
        "z": lambda idx: ((raw[:, idx] - mu[idx, None, None]) / sd[idx, None, None]).sum(1),
    }
    ds = det.dataset(samples)
    masks = np.stack([ds[i]["mask"].numpy() > 0.5 for i in range(len(ds))])
    labels = np.array([s.label for s in samples])
    defect = np.array([s.defect for s in samples])
    halves = declared_subsets(layout, samples)[0] or {"all": np.ones(len(samples), bool)}
    n_scales = raw.shape[1]
    subsets = {
        "all": list(range(n_scales)),
        "no_first": list(range(1, n_scales)),
        "no_last": list(range(n_scales - 1)),
    }
    rows = []
    for (sub, idx), norm, sigma in itertools.product(subsets.items(), norms, SIGMAS):
        amap = GaussianBlur(sigma)(torch.from_numpy(norms[norm](idx))).numpy()
        flat = np.sort(amap.reshape(len(amap), -1), 1)[:, ::-1]
        for top in TOPS:
            k = max(1, round(top * flat.shape[1]))
            scores = flat[:, :k].mean(1)
            row = {"scales": sub, "norm": norm, "sigma": sigma, "top": top}
            for half, sel in halves.items():
                m = compute_metrics(scores[sel], labels[sel], amap[sel], masks[sel])
                if top != TOPS[0]:  # pixel metrics do not depend on the score
                    m = {k: v for k, v in m.items() if k.startswith("image")}
                row[half] = m
                row[half + "_per_class"] = per_class_image_auroc(
                    scores[sel], labels[sel], defect[sel]
                )
            rows.append(row)
            shown = {k: round(v, 4) for k, v in row[next(iter(halves))].items() if v}
            print(sub, norm, sigma, top, shown, flush=True)
    write_result(args.out, {"checkpoint": str(args.checkpoint), "rows": rows})


if __name__ == "__main__":
    main()
