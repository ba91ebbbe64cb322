"""Benchmark: a distillation checkpoint's test metrics with its scales summed plainly (every
weight 1, the published map) and normalised (each scale divided by its mean over the
checkpoint's held-out good training images, kdad's ``scale_norm``): the same trained student,
so the difference is the weighting alone. On Magnetic Tile, also by dev and final half.

    python bench/scale_norm.py runs/weld_s0/best.pt --out bench/results/scale_norm/weld_s0.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import kdad
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint


def variant(ckpt: Path, tmp: Path, normalised: bool) -> dict:
    """Test metrics of a copy of ``ckpt`` whose scale weights are 1 or fitted anew."""
    state = load_checkpoint(ckpt)
    state.pop("path")
    state["model"].pop("scale_weights", None)  # loads as 1: the plain sum
    state["config"]["model"]["options"]["scale_norm"] = normalised
    path = tmp / ("normalised.pt" if normalised else "plain.pt")
    save_checkpoint(path, state)
    kdad.calibrate(path)  # fits the weights when scale_norm is on, then the thresholds
    res = kdad.evaluate(path)
    weights = load_checkpoint(path)["model"]["scale_weights"]
    out = {
        "scale_weights": weights.tolist(),
        "metrics": res["metrics"],
        "image_auroc_per_class": res["image_auroc_per_class"],
    }
    out["subsets"] = res["subsets"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    try:
        result = {
            "benchmark": "scale_norm",
            "settings": {"checkpoint": str(args.checkpoint)},
            "plain": variant(args.checkpoint, tmp, False),
            "normalised": variant(args.checkpoint, tmp, True),
        }
    finally:
        shutil.rmtree(tmp)
    write_result(args.out, result)
    for v in ("plain", "normalised"):
        m = result[v]["metrics"]
        keys = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
        print(v, {k: round(100 * m[k], 1) for k in keys})


if __name__ == "__main__":
    main()
