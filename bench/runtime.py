"""Benchmark: inference runtimes on this CPU, per model: PyTorch eager against onnxruntime (and
OpenVINO, float32, when installed), at 256x256 with the pre- and post-processing of the exported
graph, batch-1 latency and batch-16 throughput, and the share of the machine's measured
matrix-multiply peak each reaches (model GFLOPs x images/s / peak GFLOP/s).

Each model is trained for one epoch on the data (weights do not change the cost, a calibrated
checkpoint is what export needs), exported, and timed on uint8 images of the data's size.

    python bench/runtime.py --out bench/results/runtime.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import kdad
from kdad.data.io import read_image
from kdad.data.layouts import find_samples
from kdad.export import Deployable, OnnxRunner, deployable, export_onnx
from kdad.models import MODELS


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best float32 GFLOP/s of an n x n matrix product on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - tic) / 1e9)
    return best


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each call after two warm-up calls."""
    fn()
    fn()
    out = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        out.append(time.perf_counter() - tic)
    return out


def measure(run: Callable[[np.ndarray], object], one: np.ndarray, batch: np.ndarray) -> dict:
    lat = timed(lambda: run(one), 30)
    thr = timed(lambda: run(batch), 5)
    return {
        "batch1_ms_median": 1000 * statistics.median(lat),
        "batch1_ms_p90": 1000 * float(np.quantile(lat, 0.9)),
        "batch16_images_per_s": len(batch) / statistics.median(thr),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/runtime.json")
    args = ap.parse_args()

    peak = matmul_peak(args.threads)
    print(f"matmul peak: {peak:.1f} GFLOP/s on {args.threads} threads")
    src = read_image(find_samples(args.data, "test")[0].path)
    one = (src * 255).round().astype(np.uint8)[None]  # (1, H, W, 3) as a camera gives it
    batch = np.repeat(one, 16, axis=0)
    try:
        import openvino as ov
    except ImportError:
        ov = None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            run = Path(tmp) / name
            kdad.train(
                data=args.data,
                model=name,
                epochs=1,
                image_size=args.image_size,
                out=run,
                progress=False,
            )
            export_onnx(run, run / "onnx")
            det = kdad.load(run, device="cpu")
            graph = deployable(det)
            torch.set_num_threads(args.threads)
            x = torch.randn(1, 3, args.image_size, args.image_size)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                det.model.eval()(x)
            gflops = counter.get_total_flops() / 1e9

            def eager(images: np.ndarray, graph: Deployable = graph) -> object:
                with torch.inference_mode():
                    return graph(torch.from_numpy(images))

            ort_det = OnnxRunner(run / "onnx", threads=args.threads)
            row = {
                "gflops_per_image": gflops,
                "pytorch_eager": measure(eager, one, batch),
                "onnxruntime": measure(ort_det.run, one, batch),
            }
            if ov is not None:
                compiled = ov.Core().compile_model(
                    str(run / "onnx" / "model.onnx"),
                    "CPU",
                    # f32 as the others: by default OpenVINO runs bf16 where the CPU has it
                    {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"},
                )
                row["openvino"] = measure(lambda im, c=compiled: c(im), one, batch)
            for runtime in ("pytorch_eager", "onnxruntime", "openvino"):
                if runtime in row:
                    r = row[runtime]
                    r["share_of_peak_batch16"] = gflops * r["batch16_images_per_s"] / peak
            rows[name] = row
            print(name, row)
    write_result(
        args.out,
        {
            "benchmark": "runtime",
            "settings": vars(args),
            "matmul_peak_gflops": peak,
            "input_shape": list(one.shape),
            "openvino": None if ov is None else ov.__version__,
            "models": rows,
        },
    )


if __name__ == "__main__":
    main()
