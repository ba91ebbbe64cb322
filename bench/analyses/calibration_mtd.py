"""Benchmark: does a threshold set on held-out good training images alone keep its promise on
the test set? For each run (trained and tested on Magnetic Tile), calibrate its best.pt from
its own held-out good images, then measure on the test scores of that same checkpoint the
false-alarm rate over the good test images and the share of defective images caught.

    python bench/analyses/calibration_mtd.py RUN_DIR [RUN_DIR ...] \
        --out bench/results/calibration_mtd.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import write_result

from kdad.detector import recalibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders holding best.pt and metrics.json")
    ap.add_argument("--false-alarm-rate", type=float, default=0.01)
    ap.add_argument("--out", default="bench/results/calibration_mtd.json")
    args = ap.parse_args()

    rows = []
    for run in map(Path, args.runs):
        res = json.loads((run / "metrics.json").read_text())
        ckpt = Path(res["protocol"]["checkpoint"])
        cal = recalibrate(ckpt, args.false_alarm_rate)
        scores = np.array([r["score"] for r in res["per_image"]])
        labels = np.array([r["label"] for r in res["per_image"]])
        flagged = scores >= cal["image_threshold"]
        per_class = {}
        for d in sorted({r["defect"] for r in res["per_image"]} - {"good"}):
            sel = np.array([r["defect"] == d for r in res["per_image"]])
            per_class[d] = float(flagged[sel].mean())
        rows.append(
            {
                "run": str(run),
                "checkpoint_epoch": res["protocol"]["epoch"],
                "held_out_good_images": cal["images"],
                "image_threshold": cal["image_threshold"],
                "good_test_images": int((labels == 0).sum()),
                "false_alarm_rate": float(flagged[labels == 0].mean()),
                "defective_test_images": int((labels == 1).sum()),
                "caught": float(flagged[labels == 1].mean()),
                "caught_per_class": per_class,
            }
        )
        print(json.dumps(rows[-1]))
    write_result(
        args.out,
        {
            "benchmark": "calibration_mtd",
            "target_false_alarm_rate": args.false_alarm_rate,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
