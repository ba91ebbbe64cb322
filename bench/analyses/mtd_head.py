"""Can a segmentation head lift a trained distiller's pixel metrics on Magnetic Tile? Trains
DeSTSeg's head (``models/seghead.py``) on the frozen teacher and student of one checkpoint, on
the run's fitting images with synthetic defects, then scores the dev half with the head's map,
the distiller's own map, and both (the distiller's map divided by its mean maximum on the held-out
good images, times the head's probability).

Defects (``--defects``): ``perlin`` (kdad's DRAEM-style ones), ``level`` (a large region of the
image itself re-toned, as Magnetic Tile's Uneven class looks), or ``mix`` (half each).

    python bench/analyses/mtd_head.py runs/stu_bf16_s0/best.pt --defects mix --epochs 16 \
        --out bench/results/mtd_levers/head_mix_s0.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import checkpoint_parser, mtd_half, write_result

from kdad.data.dataset import TrainSet
from kdad.data.layouts import training_samples
from kdad.detector import Detector
from kdad.metrics import compute_metrics, per_class_image_auroc
from kdad.models.layers import kaiming_init
from kdad.models.seghead import SegHead, head_loss, head_output
from kdad.synth.perlin import perlin_mask, perlin_noise, synthesize


def level_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A large region (H, W) bool: half the time a band from one border to a wavy line across
    the part (15-60% of its depth), else a blob of coarse Perlin noise (1-2 cells per axis)."""
    h, w = shape
    if rng.random() < 0.5:
        return perlin_mask(shape, rng, threshold=0.2, max_scale=2)
    k = rng.integers(4)
    n, depth = (w, h) if k % 2 == 0 else (h, w)  # band along the chosen border's length n
    line = rng.uniform(0.15, 0.6) * depth + 0.08 * depth * perlin_noise(n, (1, 2), rng)[0]
    band = np.arange(depth)[:, None] < line[None, :]  # (depth, n): the top band
    return np.ascontiguousarray(np.rot90(band, k))  # (h, w): the band at border k


def level_change(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) float image with a large region re-toned: brighter or darker by 15-50%,
    its fine texture sharpened or smoothed, the region's edge softened over about 2 px (as
    Magnetic Tile's Uneven class, a surface whose level or grain changes over a wide area).
    Returns (image, mask (H, W) bool)."""
    mask = level_mask(image.shape[:2], rng)
    blur = ndimage.gaussian_filter(image, (1.5, 1.5, 0))
    grain = rng.uniform(-1, 1)  # < 0: smoother, > 0: stronger texture
    tex = image + grain * (image - blur)
    tex = tex * (1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.5))
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)[..., None]
    out = np.clip(alpha * tex + (1 - alpha) * image, 0, 1).astype(np.float32)
    return out, mask


class Defects(Dataset):
    """Fitting images, half of them with a synthetic defect drawn by (seed, epoch, index)."""

    def __init__(self, images: TrainSet, kind: str) -> None:
        self.images, self.kind, self.epoch = images, kind, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.images.seed, self.epoch, i])
        x = self.images.load(self.images.samples[i].path)  # (3, H, W)
        mask = torch.zeros(x.shape[-2:])
        if rng.random() < 0.5:
            level = self.kind == "level" or (self.kind == "mix" and rng.random() < 0.5)
            img, m = (level_change if level else synthesize)(x.permute(1, 2, 0).numpy(), rng)
            x, mask = torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(m).float()
        return {"image": (x - self.images.mean) / self.images.std, "mask": mask}


@torch.no_grad()
def maps(det: Detector, head: SegHead, samples: list) -> dict[str, np.ndarray]:
    """Head maps and scores, the distiller's maps and scores, masks, all (N, H, W) or (N,)."""
    model, out = det.model.eval(), {"head": [], "hs": [], "dist": [], "ds": [], "mask": []}
    head.eval()
    for chunk in DataLoader(det.dataset(samples), batch_size=16):
        x = chunk["image"]  # (B, 3, H, W)
        t, s = model.teacher(x), model.student(x)
        h = head_output(head.segment(t, s), tuple(x.shape[-2:]), 100 / 256**2)
        d = model.output(t, s, x)
        for k, v in zip(out, (h.anomaly_map, h.score, d.anomaly_map, d.score, chunk["mask"])):
            out[k].append(v)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    ap = checkpoint_parser(__doc__)
    ap.add_argument("--defects", choices=("perlin", "level", "mix"), default="mix")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--half", choices=("dev", "final"), default="dev")
    args = ap.parse_args()
    torch.manual_seed(0)
    det = Detector.load(args.checkpoint)
    cfg, model = det.cfg, det.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fit, held = training_samples(cfg.data)
    norm = (tuple(det.mean.flatten().tolist()), tuple(det.std.flatten().tolist()))
    data = Defects(TrainSet(fit, cfg.data.image_size, *norm, cfg.train.seed), args.defects)
    head = SegHead(model.teacher.channels, 64)
    kaiming_init(head)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    tic = time.perf_counter()
    for epoch in range(args.epochs):
        data.epoch, losses = epoch, []
        head.train()
        loader = DataLoader(data, batch_size=16, shuffle=True, num_workers=1, drop_last=True)
        for batch in loader:
            x = batch["image"]
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                t, s = model.teacher(x), model.student(x)
            loss = head_loss(
                head.segment([a.float() for a in t], [b.float() for b in s]), batch["mask"]
            )["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"epoch {epoch} loss {np.mean(losses):.4f} {time.perf_counter() - tic:.0f} s")
    train_s = time.perf_counter() - tic
    good = maps(det, head, held)
    scale = good["ds"].mean()  # the distiller's mean score on held-out good images
    test = mtd_half(cfg.data.path, args.half)
    o = maps(det, head, test)
    labels = np.array([s.label for s in test])
    defect = np.array([s.defect for s in test])
    fused = o["dist"] / scale * o["head"]
    rows = {
        "head": (o["hs"], o["head"]),
        "distiller": (o["ds"], o["dist"]),
        "distiller score, head map": (o["ds"], o["head"]),
        "distiller score, product map": (o["ds"], fused),
    }
    result = {}
    for name, (scores, amap) in rows.items():
        m = compute_metrics(scores, labels, amap, o["mask"] > 0.5)
        per = per_class_image_auroc(scores, labels, defect)
        result[name] = {"metrics": m, "per_class": per}
        keys = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "iap")
        cells = [f"{k} {100 * m[k]:.1f}" for k in keys]
        print(f"{name:30s} " + " ".join(cells + [f"{c} {100 * v:.0f}" for c, v in per.items()]))
    settings = {
        "checkpoint": str(args.checkpoint),
        "defects": args.defects,
        "epochs": args.epochs,
        "half": args.half,
        "train_seconds": train_s,
    }
    write_result(args.out, {"benchmark": "mtd_head", "settings": settings, "rows": result})


if __name__ == "__main__":
    main()
