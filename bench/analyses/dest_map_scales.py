"""Which scales DeST-DDPM's map should take from the student, over several trained checkpoints
(seeds) of one dataset: the pixel metrics of the model's map rule (the head's map plus the
student's, each standardised over the held-out good images' pixels) with the student's map
made of other teacher scales, smoothed more, or weighted against the head's. Magnetic Tile: one
half (dev by default: where settings are chosen); another dataset: its whole test set. Prints
mean ± population std over the checkpoints.

    python bench/analyses/dest_map_scales.py runs/dest_default/mtd_dest_perlin-s{0,1,2}/best.pt \
        --out bench/results/dest_default/dest_map_scales_mtd_dev.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).parent))  # bench/analyses/, for dest_scores
from common import write_result
from dest_scores import KEYS, outputs, rescored_samples, student_map, z

from kdad.data.layouts import training_samples
from kdad.detector import Detector
from kdad.metrics import compute_metrics


@dataclass(frozen=True)
class Rule:
    """A map rule: the student's map from ``scales`` (teacher scale index: weight, each scale
    over its mean on the good images), smoothed by ``sigma`` px; the head's weighted ``head``."""

    scales: dict[int, float]
    sigma: float = 4.0
    head: float = 1.0

    def student(self, cos: list[np.ndarray], means: list[float]) -> np.ndarray:
        """Per-scale (N, H, W) 1 - cos maps -> the student's map (N, H, W)."""
        weighted = [w * cos[i] for i, w in self.scales.items()]
        return student_map(weighted, [means[i] for i in self.scales], self.sigma)

    def map(self, o: dict, good: dict, means: list[float]) -> np.ndarray:
        """The model's map under this rule for the outputs ``o``, standardised on ``good``."""
        student = z(self.student(o["cos"], means), self.student(good["cos"], means))
        return student + self.head * z(o["head"], good["head"])


RULES = {  # the model's: scales of stride 8, 16, 32 (indices 1-3 of four), sigma 4, head 1
    "the model's (strides 8-32)": Rule({1: 1, 2: 1, 3: 1}),
    "strides 4-32": Rule({0: 1, 1: 1, 2: 1, 3: 1}),
    "strides 8-16": Rule({1: 1, 2: 1}),
    "strides 16-32": Rule({2: 1, 3: 1}),
    "stride 32": Rule({3: 1}),
    "stride 32, smoothed 16 px": Rule({3: 1}, sigma=16.0),
    "strides 8-32, smoothed 16 px": Rule({1: 1, 2: 1, 3: 1}, sigma=16.0),
    "strides 8-32, head weight 0.5": Rule({1: 1, 2: 1, 3: 1}, head=0.5),
    "strides 8-32, no head": Rule({1: 1, 2: 1, 3: 1}, head=0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--half", choices=("dev", "final"), default="dev")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    per: dict[str, dict[str, dict]] = {}
    for ckpt in args.checkpoints:
        det = Detector.load(ckpt)
        if len(det.model.teacher.stages) != 4:
            raise SystemExit(f"{ckpt}: the rules name four teacher scales, it has another number")
        _, held = training_samples(det.cfg.data)
        good = outputs(det, held)
        test = rescored_samples(det, args.half)
        o = outputs(det, test)
        labels = np.array([s.label for s in test])
        means = [m.mean() for m in good["cos"]]
        per[str(ckpt)] = {}
        for name, rule in RULES.items():
            m = compute_metrics(o["model_score"], labels, rule.map(o, good, means), o["masks"])
            per[str(ckpt)][name] = {k: m[k] for k in KEYS}
    summary = {}
    for name in RULES:
        v = np.array([[r[name][k] for k in KEYS] for r in per.values()])  # (checkpoints, 4)
        summary[name] = {
            k: {"mean": float(a), "std": float(s)} for k, a, s in zip(KEYS, v.mean(0), v.std(0))
        }
        cells = " ".join(
            f"{k} {100 * a:.1f} ± {100 * s:.1f}" for k, a, s in zip(KEYS, v.mean(0), v.std(0))
        )
        print(f"{name:32s} {cells}")
    settings = {"checkpoints": [str(c) for c in args.checkpoints], "half": args.half}
    write_result(
        args.out,
        {
            "benchmark": "dest_map_scales",
            "settings": settings,
            "summary": summary,
            "per_checkpoint": per,
        },
    )


if __name__ == "__main__":
    main()
