"""Benchmark: how a model's Magnetic Tile test metrics move with training length, on the dev half.

Trains one run without early stopping and tests it after every ``--step`` epochs (resuming
reproduces an unbroken run exactly, so each point is the same run's state at that epoch);
writes the dev-half metrics and per-class image AUROC at each point, beside the validation
metric the run would have kept its epoch by.

    python bench/analyses/mtd_curve.py --set stages='[stage3, stage5, stage6]' --epochs 20 \
        --step 4 \\
        --out bench/results/mtd_levers/curve_s356.json
    python bench/analyses/mtd_curve.py --config magnetic_tile_stu --epochs 20 --step 4 \\
        --out bench/results/mtd_levers/curve_stu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import parse_sets, write_result

import kdad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--step", type=int, default=4)
    ap.add_argument("--model", help="kdad model (the config's, else rd)")
    ap.add_argument("--config", help="a kdad run config (YAML file or shipped recipe name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run-dir", default="runs/mtd_curve")
    ap.add_argument("--out", default="bench/results/mtd_curve.json")
    args = ap.parse_args()
    extra = parse_sets(args.set)
    run = Path(args.run_dir)
    points = []
    for epochs in range(args.step, args.epochs + 1, args.step):
        kdad.train(
            config=args.config,
            data=args.data,
            model=args.model,
            epochs=epochs,
            patience=0,
            seed=args.seed,
            out=run,
            resume=(run / "checkpoint.pt").is_file(),
            progress=False,
            **extra,
        )
        res = kdad.evaluate(run / "checkpoint.pt", out=run / f"test_e{epochs}")
        history = torch.load(run / "checkpoint.pt", weights_only=True)["history"]
        halves = res["subsets"]
        points.append(
            {
                "epoch": epochs,
                "val": history[-1].get("val"),
                "loss": history[-1]["loss"],
                "dev": halves["dev"],
            }
        )
        m = halves["dev"]["metrics"]
        print(epochs, {k: round(m[k], 3) for k in ("image_auroc", "pixel_auroc", "pixel_ap")})
    write_result(args.out, {"benchmark": "mtd_curve", "settings": vars(args), "points": points})


if __name__ == "__main__":
    main()
