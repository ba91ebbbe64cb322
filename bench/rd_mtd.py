"""Benchmark: RD (or --model) with the default EfficientNet-Lite0 teacher on Magnetic Tile
(DifferNet split), or on any dataset given with --data.

Trains (kdad's default schedule unless --epochs, --patience or --val-every say otherwise), tests,
and times inference; writes a JSON result (metrics, per-class image AUROC, wall time of training,
epochs run and kept, seconds per epoch, images/second at batch 1 and 16, machine, date, commit,
command).

    python bench/rd_mtd.py --out bench/results/rd_mtd_default_s0.json
    python bench/rd_mtd.py --epochs 30 --patience 0 --out bench/results/rd_mtd_e30_s0.json
    python bench/rd_mtd.py --set stages='[stage3, stage5, stage6]' --set augment='[hflip]' ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_sets, write_result

import kdad
from kdad.data.io import read_image


def throughput(det: kdad.Detector, images: list[np.ndarray], batch: int, repeats: int) -> float:
    """Images per second of preprocess + model on decoded images, after one warm-up batch."""
    det.predict(images[:batch], batch_size=batch)
    tic = time.perf_counter()
    for _ in range(repeats):
        det.predict(images, batch_size=batch)
    return repeats * len(images) / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--epochs", type=int, help="most epochs (kdad's default)")
    ap.add_argument("--patience", type=int, help="early stopping patience (kdad's default)")
    ap.add_argument("--val-every", type=int, help="epochs between validations (kdad's default)")
    ap.add_argument("--image-size", type=int, help="input side (the config's, else 256)")
    ap.add_argument("--backbone", help="teacher (the config's, else efficientnet_lite0)")
    ap.add_argument("--model", help="kdad model (the config's, else rd)")
    ap.add_argument("--config", help="a kdad run config (YAML file or shipped recipe name)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any kdad.train keyword, YAML value (e.g. lr=0.001, stages='[stage3, stage5]')",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="runs/bench_rd_mtd")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --run-dir (train_wall_seconds then covers only "
        "this part; seconds_per_epoch covers every epoch)",
    )
    ap.add_argument("--out", default="bench/results/rd_mtd.json")
    args = ap.parse_args()

    extra = parse_sets(args.set)
    tic = time.perf_counter()
    ckpt = kdad.train(
        config=args.config,
        data=args.data,
        patience=args.patience,
        val_every=args.val_every,
        model=args.model,
        epochs=args.epochs,
        seed=args.seed,
        out=args.run_dir,
        resume=args.resume,
        progress=False,
        **{"image_size": args.image_size, "backbone": args.backbone, **extra},
    )
    train_seconds = time.perf_counter() - tic
    # The whole run's epochs (best.pt stops at the kept epoch); the median resists a slow outlier.
    history = torch.load(Path(args.run_dir) / "checkpoint.pt", weights_only=True)["history"]
    maps_file = Path(args.run_dir) / "test_maps.npz"
    res = kdad.evaluate(ckpt, out=args.run_dir, save_maps=maps_file)
    det = kdad.load(ckpt, device="cpu")
    images = [read_image(r["path"]) for r in res["per_image"][:32]]
    result = {
        "benchmark": "rd_mtd",
        "settings": vars(args),
        "metrics": res["metrics"],
        "image_auroc_per_class": res["image_auroc_per_class"],
        "counts": res["counts"],
        "train_wall_seconds": train_seconds,
        "epochs_run": history[-1]["epoch"],
        "stopped_early": bool(history[-1].get("stopped_early")),
        "seconds_per_epoch": float(np.median([h["seconds"] for h in history])),
        "kept_epoch": res["protocol"]["epoch"],
        "validation": [{"epoch": h["epoch"], **h["val"]} for h in history if "val" in h],
        "final_loss": history[-1]["loss"],
        "images_per_second": {
            "batch1": throughput(det, images, 1, 1),
            "batch16": throughput(det, images, 16, 2),
        },
        "protocol": res["protocol"],
    }
    result["subsets"] = res["subsets"]
    write_result(args.out, result)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "metrics",
                    "image_auroc_per_class",
                    "train_wall_seconds",
                    "epochs_run",
                    "kept_epoch",
                    "images_per_second",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
