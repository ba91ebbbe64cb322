"""Diagnose a Magnetic Tile run's pixel metrics from its saved test maps (`kdad test
--save-maps`, or the test_maps.npz that bench/rd_mtd.py writes), on the dev half only.

Why is pixel AUROC low: defects missed inside their own image (localisation), or good images
whose whole map runs high (an offset between images), or the image border? Writes a JSON of:
- pooled pixel AUROC and AP, and per defect class (that class's images with the good ones);
- within-image pixel AUROC, the mean over defective images of each image's own AUROC;
- the same pooled metrics and image AUROC after subtracting each map's median (a per-image
  offset that needs no label, so a deployable map);
- where the highest good-image pixels lie: the share of the top 0.1% within 16 px of a border;
- which normal pixels outrank each class's defect pixels: the AUROC of its defect pixels against
  the good images' pixels, and against the defect-free pixels of the defective images of the
  other classes, near a defect (within NEAR px) and far from one; each group's median map; and
  pooled pixel AUROC without the class;
- whether a tile's defect-free area alone tells defective tiles from good ones: image AUROC
  when each tile is scored by the median of its pixels more than NEAR px from any defect, over
  all classes, per class, and within quartiles of the original image area and brightness (the
  image files are read for these).

    python bench/analyses/mtd_maps.py runs/recipe_s0/test_maps.npz \
        --out bench/results/mtd_maps_s0.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import write_result

from kdad.data.layouts import mtd_dev_names, mtd_key
from kdad.metrics import PixelCurve, image_auroc

BORDER = 16  # pixels from an edge that count as the border
NEAR = 48  # pixels from a defect within which a normal pixel is in its halo (stride 32 + blur)


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


def far_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: the pixels more than NEAR px from any defect of their image."""
    return np.stack([ndimage.distance_transform_edt(~m) > NEAR for m in masks])


def outranked(
    maps: np.ndarray, masks: np.ndarray, far: np.ndarray, classes: np.ndarray, good: np.ndarray
) -> dict[str, dict]:
    """Per defect class, its defect pixels' AUROC against each group of normal pixels, the
    groups' median map values, and pooled pixel AUROC without the class (see the docstring)."""
    groups = {
        "good_images": np.broadcast_to(good[:, None, None], masks.shape),
        "defective_images_near": ~good[:, None, None] & ~masks & ~far,
        "defective_images_far": ~good[:, None, None] & far,
    }
    out = {}
    for c in sorted(set(classes[~good])):
        own = (classes == c)[:, None, None]
        pos = maps[masks & own]
        row = {"defect_median": float(np.median(pos))}
        for name, sel in groups.items():
            neg = maps[sel & ~own]
            y = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
            row[name] = {
                "auroc": PixelCurve.build(np.r_[pos, neg], y).auroc(),
                "median": float(np.median(neg)),
            }
        row["pooled_pixel_auroc_without"] = PixelCurve.build(
            maps[~own[:, 0, 0]], masks[~own[:, 0, 0]]
        ).auroc()
        out[c] = row
    return out


def _area_and_grey(path: str) -> tuple[int, float]:
    """An image file's pixel count and mean grey level."""
    with Image.open(path) as im:
        return im.width * im.height, float(np.asarray(im.convert("L"), np.float32).mean())


def far_from_defects(
    maps: np.ndarray, far: np.ndarray, labels: np.ndarray, classes: np.ndarray, paths: list
) -> dict[str, object]:
    """Image AUROC of each tile's median map value over its pixels more than NEAR px from any
    defect (a good tile's whole map): overall, per class against the good tiles, and within
    quartiles of image area and mean grey level (see the module docstring)."""
    score = np.array([np.median(m[f]) for m, f in zip(maps, far)])
    good = labels == 0
    out: dict[str, object] = {
        "image_auroc": image_auroc(score, labels),
        "far_area_share_median": float(np.median(far[~good].mean((1, 2)))),
        "per_class": {
            c: image_auroc(score[good | (classes == c)], labels[good | (classes == c)])
            for c in sorted(set(classes[~good]))
        },
    }
    area, grey = np.array([_area_and_grey(p) for p in paths]).T  # (N,), (N,)
    covariates = {"area": area, "grey_level": grey}
    for name, v in covariates.items():
        edges = np.quantile(v, [0, 0.25, 0.5, 0.75, 1])
        bins = [(a, b, (v >= a) & (v <= b)) for a, b in itertools.pairwise(edges)]
        out[f"by_{name}"] = [
            {
                "range": [float(a), float(b)],
                "good": int((good & k).sum()),
                "image_auroc": image_auroc(score[k], labels[k]),
            }
            for a, b, k in bins
        ]
    return out


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
    far = far_masks(masks)  # (N, H, W)
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
        "near_px": NEAR,
        "outranked": outranked(maps, masks, far, classes, good),
        "far_from_defects": far_from_defects(maps, far, labels, classes, list(paths[sel])),
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
