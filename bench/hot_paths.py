"""Benchmark: the hot paths of training and scoring on this machine, each alone: the frozen
teacher's forward (eval, no gradients, batch 16 at 256x256, as training runs it: weights and
input channels-last) of each EfficientNet-Lite, and one Perlin defect (``synthesize``, 256x256,
the training set's every other image). Medians of repeated runs after a warm-up.

Run it at two commits to compare them (it uses only what both have):

    python bench/hot_paths.py --out bench/results/hot_paths/after.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result
from runtime import timed

from kdad.backbones import build_backbone, get_spec
from kdad.synth.perlin import synthesize


def teacher_seconds(name: str, batch: int, side: int, repeats: int) -> float:
    """Median seconds of the teacher's stage features for one batch."""
    torch.manual_seed(0)
    net = build_backbone(name, pretrained=False).eval().to(memory_format=torch.channels_last)
    stages = list(get_spec(name).deep_stages)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return statistics.median(timed(lambda: net.features(x, stages), repeats))


def perlin_seconds(side: int, count: int) -> float:
    """Median seconds of one synthetic defect on a (side, side, 3) image, over ``count`` seeds
    (each draws another mask, texture and threshold in DeST-DDPM's wide range)."""
    image = np.random.default_rng(0).random((side, side, 3)).astype(np.float32)
    times = []
    for i in range(count):
        rng = np.random.default_rng([0, i])
        tic = time.perf_counter()
        synthesize(image, rng, threshold=rng.uniform(0.1, 0.6))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=[f"efficientnet_lite{i}" for i in range(3)])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    teacher = {
        name: teacher_seconds(name, args.batch, args.side, args.repeats) for name in args.backbones
    }
    for name, s in teacher.items():
        print(f"{name}: {s * 1000:.0f} ms a batch of {args.batch}")
    perlin = perlin_seconds(args.side, 200)
    print(f"perlin defect: {perlin * 1000:.1f} ms an image")
    write_result(
        args.out,
        {
            "benchmark": "hot_paths",
            "batch": args.batch,
            "side": args.side,
            "teacher_seconds_per_batch": teacher,
            "perlin_seconds_per_image": perlin,
        },
    )


if __name__ == "__main__":
    main()
