"""How a trained DDPM paints defects, measured: the same good images and the same Perlin regions
painted under each setting (depth, perturbation std, its grain, the mask rule), every defect
measured at the detector's input size against its clean source.

Per defect (gray levels 0-255, the channels' mean):
- ``labelled``: share of the Perlin region the mask keeps (painting keeps only the mask's pixels,
  so the mask is exactly what differs from the source);
- ``change``: mean |painted - source| over the mask;
- ``coherence``: mean |change blurred over 2 px| / mean |change| over the mask (1: a blotch or
  a level step, about 0.2: white specks);
- ``visibility``: ``kdad.synth.diffusion.visibility``, mean |change blurred over 2 px| over the
  mask, divided by the part's own structure at that scale there (mean |source blurred over 2 px
  - source blurred over 8 px|): above 1 the change stands out of the part's pattern;
- ``detail``: the painted pixels' finest texture (mean |x - x blurred over 1 px|) over the
  source's, in the mask (1: painted at full resolution; well under 1: a blurred upsampling);
- ``specks``: share of the mask in 8-connected pieces under 16 pixels.
Medians over the defects are reported, and a sheet of the first images (source, painted, painted
with the mask outlined) per setting is written under ``--sheets`` (not kept in the repository).

    python bench/analyses/paint_probe.py --ddpm runs/paint/mtd256 \
        --data ../shared/data/magnetic-tile --set strength=0.1,0.2 grain=0,4 \
        --out bench/results/paint/mtd_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import write_result

from kdad.config import DataConfig, PaintConfig
from kdad.data.dataset import choose_size, input_hw
from kdad.data.layouts import training_samples
from kdad.engine.distributed import native_bf16
from kdad.synth.diffusion import _load, defect_mask, load_ddpm, visibility
from kdad.synth.perlin import perlin_mask

SHEET_ROWS = 8


def measure(src: np.ndarray, out: np.ndarray, label: np.ndarray, region: np.ndarray) -> dict:
    """One defect's measures: ``src``, ``out`` (H, W) gray 0-255; ``label``, ``region`` bool."""
    delta = out - src

    def b(x: np.ndarray, s: float) -> np.ndarray:
        return ndimage.gaussian_filter(x, s, mode="reflect")

    on = label
    mean = lambda x: float(np.abs(x)[on].mean()) if on.any() else 0.0  # noqa: E731
    pieces, n = ndimage.label(label, np.ones((3, 3)))
    sizes = ndimage.sum(label, pieces, range(1, n + 1)) if n else np.zeros(0)
    small = float(sizes[sizes < 16].sum() / max(1, label.sum()))
    return {
        "labelled": float(label.sum() / max(1, region.sum())),
        "change": mean(delta),
        "coherence": mean(b(delta, 2)) / max(mean(delta), 1e-6),
        "detail": mean(out - b(out, 1)) / max(mean(src - b(src, 1)), 1e-6),
        "specks": small,
    }


def outline(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) 0-255 gray with ``mask``'s border in red: (H, W, 3) uint8."""
    rgb = np.repeat(gray.clip(0, 255).astype(np.uint8)[..., None], 3, 2)
    edge = mask & ~ndimage.binary_erosion(mask)
    rgb[edge] = (255, 0, 0)
    return rgb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ddpm", required=True, help="DDPM run folder (kdad synth train --out)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, nargs="+", help="detector input size (default: auto)")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="KEY=V1,V2 PaintConfig values swept")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sheets", default="runs/paint_sheets", help="folder for the sheets (PNG)")
    a = ap.parse_args()

    model, cfg = load_ddpm(a.ddpm)
    bf16 = native_bf16(torch.device("cpu"))
    samples = training_samples(DataConfig(path=a.data))[0]
    hw = input_hw(
        a.size if a.size and len(a.size) > 1 else (a.size or [0])[0] or choose_size(samples, 32)[0]
    )
    own = input_hw(cfg["data"]["image_size"])
    order = np.random.default_rng(a.seed).permutation(len(samples))[: a.count]
    ch = model.opt.channels
    clean = torch.stack([_load(samples[i].path, own, ch) for i in order])  # (N, ch, h, w)
    full = torch.stack([_load(samples[i].path, hw, ch) for i in order])  # (N, ch, H, W)
    grid = {
        k: [yaml.safe_load(v) for v in vs.split(",")] for k, vs in (s.split("=") for s in a.set)
    }
    results = []
    sheets = Path(a.sheets) / Path(a.out).stem
    sheets.mkdir(parents=True, exist_ok=True)
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        paint = replace(PaintConfig(steps=10), **setting)
        rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
        rows, sheet = [], []
        for start in range(0, len(order), 16):
            x0 = clean[start : start + 16]
            regions = [perlin_mask(tuple(x0.shape[-2:]), rng) for _ in x0]
            region = torch.from_numpy(np.stack(regions))[:, None]  # (B, 1, h, w) bool
            p = paint
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = model.paint(x0, region.float(), p.strength, p.sigma, p.grain, p.steps, gen)
            labels = defect_mask(out.float(), x0, region, paint)
            painted = torch.where(labels, out.float(), x0)
            labels = labels.float()
            if own != hw:  # a DDPM of smaller images: its paint upsampled and pasted (as before)
                up = F.interpolate(
                    torch.cat([painted, labels, region.float()], 1), size=hw, mode="bilinear"
                )
                labels, region = (up[:, -2:-1] > 0.5).float(), up[:, -1:] > 0.5
                painted = torch.where(labels > 0, up[:, :-2], full[start : start + 16])
            src = full[start : start + 16]
            seen = visibility(painted, src, labels > 0).tolist()
            for k in range(len(x0)):
                s = (src[k].mean(0).numpy() + 1) * 127.5
                o = (painted[k].mean(0).numpy() + 1) * 127.5
                lab = labels[k, 0].numpy() > 0
                rows.append(measure(s, o, lab, region[k, 0].numpy()) | {"visibility": seen[k]})
                if len(sheet) < SHEET_ROWS:
                    sheet.append(
                        np.concatenate(
                            [
                                np.repeat(s.clip(0, 255).astype(np.uint8)[..., None], 3, 2),
                                np.repeat(o.clip(0, 255).astype(np.uint8)[..., None], 3, 2),
                                outline(o, lab),
                            ],
                            1,
                        )
                    )
        name = "_".join(f"{k}{v}" for k, v in setting.items()) or "default"
        Image.fromarray(np.concatenate(sheet, 0)).save(sheets / f"{name}.png")
        summary = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        results.append(
            {"setting": setting, "median": summary, "sheet": str(sheets / f"{name}.png")}
        )
        print(setting, {k: round(v, 3) for k, v in summary.items()}, flush=True)
    write_result(
        a.out,
        {
            "benchmark": "paint_probe",
            "ddpm": str(a.ddpm),
            "ddpm_config": cfg,
            "detector_size": list(hw),
            "count": len(order),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
