"""Diagnose a Magnetic Tile run's pixel metrics from its saved test maps (`kdad test
--save-maps`, or the test_maps.npz that bench/rd_mtd.py writes), on the dev half only.

Why is pixel AUROC low: defects missed inside their own image (localisation), or good images
whose whole map runs high (an offset between images), or the image border? Writes a JSON of:
- pooled pixel AUROC and AP, and per defect class (that class's images with the good ones);
- within-image pixel AUROC, the mean over defective images of each image's own AUROC;
- the same pooled metrics and image AUROC after subtracting each map's median (a per-image
  offset that needs no label, so a deployable map);
- where the highest good-image pixels lie: the share of the top 0.1% within 16 px of a border.

    python bench/mtd_maps.py runs/recipe_s0/test_maps.npz --out bench/results/mtd_maps_s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

from kdad.data.layouts import mtd_dev_names, mtd_key
from kdad.metrics import PixelCurve, image_auroc

BORDER = 16  # pixels from an edge that count as the border


def pooled(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Pixel AUROC and AP of the pooled pixels."""
    curve = PixelCurve.build(maps, masks)
    return {"pixel_auroc": curve.auroc(), "pixel_ap": curve.ap()}


def within_image(maps: np.ndarray, masks: np.ndarray) -> float:
    """Mean over images holding both classes of each image's own pixel AUROC."""
    scores = [PixelCurve.build(m, k).auroc() for m, k in zip(maps, masks) if 0 < k.sum() < k.size]
    return float(np.mean(scores))


def border_share(maps: np.ndarray, good: np.ndarray) -> float:
    """Share of the top 0.1% pixels of good images that lie within BORDER px of an edge."""
    values = maps[good]  # (G, H, W)
    cut = np.quantile(values, 0.999)
    h, w = values.shape[1:]
    edge = np.ones((h, w), bool)
    edge[BORDER : h - BORDER, BORDER : w - BORDER] = False
    top = values >= cut
    return float((top & edge).sum() / max(top.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("maps", help="test_maps.npz of a Magnetic Tile run")
    ap.add_argument("--out", required=True, help="JSON result")
    args = ap.parse_args()

    saved = np.load(args.maps)
    paths = saved["paths"]
    dev = mtd_dev_names()
    sel = np.array([mtd_key(Path(p)) in dev for p in paths]) & saved["has_mask"]
    maps, masks = saved["maps"][sel], saved["masks"][sel].astype(bool)
    labels, scores = saved["labels"][sel], saved["scores"][sel]
    classes = np.array([Path(p).parent.parent.name.removeprefix("MT_") for p in paths[sel]])
    centred = maps - np.median(maps.reshape(len(maps), -1), axis=1)[:, None, None]
    good = labels == 0
    result = {
        "maps": str(args.maps),
        "half": "dev",
        "images": int(sel.sum()),
        "pooled": pooled(maps, masks),
        "within_image_pixel_auroc": within_image(maps, masks),
        "median_removed": {
            **pooled(centred, masks),
            "image_auroc_of_max": image_auroc(centred.reshape(len(maps), -1).max(1), labels),
        },
        "image_auroc": image_auroc(scores, labels),
        "top_good_pixels_at_border": border_share(maps, good),
        "border_area_share": 1
        - (maps.shape[1] - 2 * BORDER)
        * (maps.shape[2] - 2 * BORDER)
        / (maps.shape[1] * maps.shape[2]),
        "per_class": {
            c: pooled(maps[good | (classes == c)], masks[good | (classes == c)])
            for c in sorted(set(classes[~good]))
        },
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
