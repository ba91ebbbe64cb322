"""Which of DeST-DDPM's outputs scores Magnetic Tile images best: one trained checkpoint, dev half
(another dataset: its whole test set), image score from the segmentation head (the mean of its
top pixels, the model's rule, or its maximum) or from the denoising student's disagreement with
the teacher (1 - cos per scale, each scale divided by its mean on the held-out good training
images, summed, smoothed, maximum: RD's map and score), or both: the sum of the two scores, each
standardised by its mean and standard deviation on the held-out good training images (the head's
map, or the sum of both maps, each standardised over the good images' pixels; the head's map
also smoothed by a Gaussian of sigma 2, 4 or 8 pixels). Pixel metrics for every map. With four
scales, the student's map also without its shallowest (stride 4, as the default's deep student).

    python bench/analyses/dest_scores.py \
        runs/mtd_dest/dest_ddpm-perlin/magnetic-tile/seed0/best.pt \
        --out bench/results/mtd_levers/dest_scores_s0.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import checkpoint_parser, mtd_half, write_result

from kdad.data.layouts import detect_layout, find_samples, training_samples
from kdad.detector import Detector
from kdad.metrics import compute_metrics, per_class_image_auroc
from kdad.models.distill import scale_maps
from kdad.models.layers import GaussianBlur
from kdad.models.seghead import head_output

KEYS = ("pixel_auroc", "pixel_ap", "aupro", "iap")  # the pixel metrics analyses report


def top_mean(maps: torch.Tensor, share: float) -> torch.Tensor:
    """The mean of the top ``share`` of each map's pixels: (N, H, W) -> (N,)."""
    k = max(1, round(share * maps[0].numel()))
    return maps.flatten(1).topk(k, dim=1).values.mean(1)


def student_map(cos: list[np.ndarray], means: list[float], sigma: float = 4.0) -> np.ndarray:
    """The student's map from per-scale (N, H, W) 1 - cos maps: each over its mean on held-out
    good images, summed, smoothed over ``sigma`` px (the model's rule: 4): (N, H, W)."""
    summed = sum(m / mu for m, mu in zip(cos, means))
    return GaussianBlur(sigma)(torch.from_numpy(np.ascontiguousarray(summed))).numpy()


def rescored_samples(det: Detector, half: str = "dev") -> list:
    """The samples a checkpoint is rescored on: one half of Magnetic Tile, else (no dev half to
    keep apart) the dataset's whole test set."""
    layout = detect_layout(Path(det.cfg.data.path))
    if layout == "mtd":
        return mtd_half(det.cfg.data.path, half)
    return find_samples(det.cfg.data.path, "test", layout)


def z(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``x`` standardised by the mean and std of ``ref``."""
    return (x - ref.mean()) / ref.std()


@torch.no_grad()
def outputs(det: Detector, samples: list, batch: int = 16) -> dict[str, np.ndarray]:
    """head: (N, H, W) the head's own maps; head_score: (N,) the mean of each head map's top
    pixels (the head's own score); model_map, model_score: the model's (with ``map`` and
    ``image_score`` both, the head's and the student's standardised and summed); cos: per scale
    (N, H, W) maps; masks: (N, H, W)."""
    model = det.model.eval()
    ds = det.dataset(samples)
    head, model_map, score, cos, masks = [], [], [], [], []
    for chunk in DataLoader(ds, batch_size=batch):
        x = chunk["image"]  # (B, 3, H, W)
        size = tuple(x.shape[-2:])
        masks.append(chunk["mask"])
        out = model(x)
        model_map.append(out.anomaly_map)
        score.append(out.score)
        t, s = model.teacher(x), model.student(x)
        logits = model.head.segment(model.mapped(t), model.mapped(s))
        head.append(head_output(logits, size, model.opt.top_share).anomaly_map)
        cos.append(scale_maps(t, s, size))
    return {
        "head": torch.cat(head).numpy(),
        "head_score": top_mean(torch.cat(head), model.opt.top_share).numpy(),
        "model_map": torch.cat(model_map).numpy(),
        "model_score": torch.cat(score).numpy(),
        "cos": [torch.cat(c).numpy() for c in zip(*cos)],
        "masks": torch.cat(masks).numpy() > 0.5,
    }


def main() -> None:
    args = checkpoint_parser(__doc__).parse_args()
    det = Detector.load(args.checkpoint)
    _, held = training_samples(det.cfg.data)
    good = outputs(det, held)
    means = [m.mean() for m in good["cos"]]
    deep = 1 if len(means) > 3 else 0  # with four scales, also the map without stride 4

    def student(o: dict, first: int = 0) -> np.ndarray:
        return student_map(o["cos"][first:], means[first:])

    def peak(amap: np.ndarray) -> np.ndarray:
        return amap.reshape(len(amap), -1).max(1)

    good_maps = {"student": student(good), "student, deep": student(good, deep)}
    good_head = good["head_score"]
    test = rescored_samples(det)
    o = outputs(det, test)
    labels = np.array([s.label for s in test])
    defect = np.array([s.defect for s in test])
    maps = {"student": student(o), "student, deep": student(o, deep)}

    rows = {
        "the model's score and map": (o["model_score"], o["model_map"]),
        "head, top mean": (o["head_score"], o["head"]),
        "head, max": (peak(o["head"]), o["head"]),
    }
    for sigma in (2.0, 4.0, 8.0):
        smooth = GaussianBlur(sigma)

        def head_map(o: dict, smooth: GaussianBlur = smooth) -> np.ndarray:
            return smooth(torch.from_numpy(o["head"])).numpy()

        ref, amap = good_maps["student, deep"], maps["student, deep"]
        pixels = z(head_map(o), head_map(good)) + z(amap, ref)
        rows[f"head smoothed {sigma:g}"] = (o["head_score"], head_map(o))
        rows[f"head smoothed {sigma:g} + student, deep, z maps"] = (o["head_score"], pixels)
    for name, amap in maps.items():
        ref = good_maps[name]
        both = z(o["head_score"], good_head) + z(peak(amap), peak(ref))
        pixels = z(o["head"], good["head"]) + z(amap, ref)  # each map z over good pixels
        rows[f"{name}, max"] = (peak(amap), amap)
        rows[f"head + {name}, z scores"] = (both, o["head"])
        rows[f"head + {name}, z scores and maps"] = (both, pixels)
        rows[f"head + {name}, z maps, max"] = (peak(pixels), pixels)
    result = {}
    for name, (scores, amap) in rows.items():
        m = compute_metrics(scores, labels, amap, o["masks"])
        per = per_class_image_auroc(scores, labels, defect)
        result[name] = {"metrics": m, "per_class": per}
        cells = [
            f"{k} {100 * m[k]:.1f}" for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
        ]
        print(f"{name:40s} " + " ".join(cells + [f"{c} {100 * v:.0f}" for c, v in per.items()]))
    half = "dev" if detect_layout(Path(det.cfg.data.path)) == "mtd" else "all"
    settings = {"checkpoint": str(args.checkpoint), "half": half, "held_out_good": len(held)}
    write_result(args.out, {"benchmark": "dest_scores", "settings": settings, "rows": result})


if __name__ == "__main__":
    main()
