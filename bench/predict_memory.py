"""Benchmark: predict streams, so memory stays flat however many images it scores.

Trains a small RD on generated parts, then predicts N images (default 10,000) and samples the
process's resident memory every 0.2 s; writes the RSS curve and its growth to JSON.

    python bench/predict_memory.py --images 10000 --out bench/results/predict_memory.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import kdad


def rss_mib() -> float:
    """Resident memory of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parts(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` gray striped parts, a few with dark squares."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:size, :size]
    paths = []
    for i in range(n):
        img = 0.5 + 0.25 * np.sin(2 * np.pi * (x + y) / 8 + rng.uniform(0, 6.3))
        if i % 10 == 9:
            r, c = rng.integers(0, size - 12, 2)
            img[r : r + 12, c : c + 12] = 0.1
        p = folder / f"{i:05d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--out", default="bench/results/predict_memory.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts(tmp / "train", 32, args.size, 0)
        ckpt = kdad.train(
            data=tmp / "train",
            epochs=2,
            batch_size=8,
            image_size=64,
            holdout=0.25,
            out=tmp / "run",
            progress=False,
        )
        det = kdad.load(ckpt, device="cpu")
        inputs = parts(tmp / "in", args.images, args.size, 1)
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            while not done.is_set():
                samples.append((time.perf_counter() - t0, rss_mib()))
                time.sleep(0.2)

        thread = threading.Thread(target=sample)
        thread.start()
        tic = time.perf_counter()
        det.predict_files(inputs, tmp / "pred", batch_size=16)
        seconds = time.perf_counter() - tic
        done.set()
        thread.join()
        lines = len((tmp / "pred" / "predictions.jsonl").read_text().splitlines())

    rss = np.array([r for _, r in samples])
    tenth = max(len(rss) // 10, 1)
    write_result(
        args.out,
        {
            "benchmark": "predict_memory",
            "images": args.images,
            "image_size_on_disk": args.size,
            "model_image_size": 64,
            "lines_written": lines,
            "seconds": seconds,
            "rss_mib": {
                "first_tenth_max": float(rss[:tenth].max()),
                "last_tenth_max": float(rss[-tenth:].max()),
                "max": float(rss.max()),
                "min": float(rss.min()),
            },
            "rss_curve": [
                [round(t, 1), round(r, 1)] for t, r in samples[:: max(len(samples) // 50, 1)]
            ],
        },
    )


if __name__ == "__main__":
    main()
