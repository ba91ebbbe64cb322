"""Benchmark: RD with the default EfficientNet-Lite0 teacher on Magnetic Tile (DifferNet split).

Trains, tests, and times inference; writes a JSON result (metrics, per-class image AUROC,
seconds per epoch, images/second at batch 1 and 16, machine, date, commit, command).

    python bench/rd_mtd.py --epochs 30 --out bench/results/rd_mtd_lite0_e30.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kdad
from kdad.data.io import read_image
from kdad.metrics import image_auroc


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _throughput(det: kdad.Detector, images: list[np.ndarray], batch: int, repeats: int) -> float:
    """Images per second of preprocess + model on decoded images, after one warm-up batch."""
    det.predict(images[:batch], batch_size=batch)
    n = 0
    tic = time.perf_counter()
    for _ in range(repeats):
        det.predict(images, batch_size=batch)
        n += len(images)
    return n / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="runs/bench_rd_mtd")
    ap.add_argument("--out", default="bench/results/rd_mtd.json")
    args = ap.parse_args()

    ckpt = kdad.train(
        data=args.data,
        layout="mtd",
        model="rd",
        backbone=args.backbone,
        epochs=args.epochs,
        image_size=args.image_size,
        seed=args.seed,
        out=args.run_dir,
        progress=False,
    )
    history = torch.load(ckpt, weights_only=True)["history"]
    res = kdad.evaluate(ckpt, out=args.run_dir)

    scores = {r["path"]: r for r in res["per_image"]}
    good = [r for r in scores.values() if r["label"] == 0]
    per_class = {}
    for defect in sorted({r["defect"] for r in scores.values()} - {"good"}):
        rows = good + [r for r in scores.values() if r["defect"] == defect]
        per_class[defect] = image_auroc(
            np.array([r["score"] for r in rows]), np.array([r["label"] for r in rows])
        )

    det = kdad.load(ckpt, device="cpu")
    images = [read_image(r["path"]) for r in list(scores.values())[:32]]
    result = {
        "benchmark": "rd_mtd",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": vars(args),
        "metrics": res["metrics"],
        "image_auroc_per_class": per_class,
        "counts": res["counts"],
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])),
        "final_loss": history[-1]["loss"],
        "images_per_second": {
            "batch1": _throughput(det, images, 1, 1),
            "batch16": _throughput(det, images, 16, 2),
        },
        "protocol": res["protocol"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "metrics",
                    "image_auroc_per_class",
                    "seconds_per_epoch",
                    "images_per_second",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
