"""Benchmark: every metric over 1,000 test images of 256x256 (65 M pixels), time and memory.

python bench/metrics_scale.py --out bench/results/metrics_scale.json
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

from kdad.metrics import compute_metrics


def synthetic_test_set(n: int, size: int, seed: int = 0):
    """Smooth float32 maps (many distinct values, like real ones) with blob defects on half."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        maps[i] = ndimage.gaussian_filter(rng.random((size, size), np.float32), 4)
        if i % 2:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, size - 40, 2)
                h, w = rng.integers(3, 40, 2)
                masks[i, r : r + h, c : c + w] = True
                maps[i, r : r + h, c : c + w] += rng.uniform(0.0, 0.2)
    return maps.max((1, 2)), (np.arange(n) % 2), maps, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default="bench/results/metrics_scale.json")
    args = ap.parse_args()

    scores, labels, maps, masks = synthetic_test_set(args.images, args.size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    tic = time.perf_counter()
    metrics = compute_metrics(scores, labels, maps, masks)
    seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_result(
        args.out,
        {
            "benchmark": "metrics_scale",
            "images": args.images,
            "size": args.size,
            "pixels": int(maps.size),
            "seconds": seconds,
            "peak_rss_gib": peak,
            "peak_rss_before_gib": before,
            "metrics": metrics,
        },
    )
    print(
        f"{maps.size / 1e6:.1f} M pixels: {seconds:.1f} s, peak RSS {peak:.2f} GiB "
        f"(inputs and Python: {before:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
