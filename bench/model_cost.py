"""Benchmark: training seconds per epoch and inference images/second of each model, side by
side on the same data (default: Magnetic Tile's training split at 256x256, batch 16).

    python bench/model_cost.py --models rd iig_rd bsdrd --out bench/results/model_cost.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result
from rd_mtd import throughput

import kdad
from kdad.data.io import read_image
from kdad.data.layouts import find_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--models", nargs="+", default=["rd", "iig_rd", "bsdrd"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--out", default="bench/results/model_cost.json")
    args = ap.parse_args()

    images = [read_image(s.path) for s in find_samples(args.data, "test")[:32]]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = kdad.train(
                data=args.data,
                model=name,
                epochs=args.epochs,
                image_size=args.image_size,
                out=Path(tmp) / name,
                progress=False,
            )
            state = torch.load(Path(tmp) / name / "checkpoint.pt", weights_only=True)
            det = kdad.load(ckpt, device="cpu")
            rows[name] = {
                "seconds_per_epoch": [h["seconds"] for h in state["history"]],
                "trainable_parameters": sum(
                    p.numel() for g in det.model.param_groups() for p in g["params"]
                ),
                "images_per_second": {
                    "batch1": throughput(det, images, 1, 1),
                    "batch16": throughput(det, images, 16, 2),
                },
            }
            print(name, rows[name])
    write_result(args.out, {"benchmark": "model_cost", "settings": vars(args), "models": rows})


if __name__ == "__main__":
    main()
