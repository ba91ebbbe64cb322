"""Benchmark: `kdad predict` end to end on a folder of images, per model and runtime (PyTorch
eager against the default, the model's graph in onnxruntime), in two modes: scoring alone
(decoding, model, CSV and JSONL lines; no heatmaps or masks written) and the default (heatmap
overlays and masks written at the images' resolution). Images/s and the share of the machine's
measured matrix-multiply peak (model GFLOPs x images/s / peak, as bench/runtime.py), and where
the time goes (cProfile of the run: decoding, preprocessing, model, maps and instances, files).

Each model is trained one epoch on the data (weights do not change the cost; DeST-DDPM two, on
Perlin defects, so that it is calibrated and no DDPM is trained), its graph written once before
timing (a cached graph is what a user's second run meets), then each predict run is timed in
this process (start-up excluded) over COUNT images: the data's own images, cycled, copied under
distinct names.

    python bench/predict_speed.py --models rd --count 1000 --out bench/results/predict_speed.json
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result
from runtime import matmul_peak

import kdad
from kdad.data.layouts import collect_images
from kdad.models import MODELS

# Where the time goes: each stage's cumulative seconds in the profile, by function name.
STAGES = {
    "decode": ("io.py", "read_image"),
    "preprocess": ("dataset.py", "preprocess"),
    "model": ("runtime.py", "__call__"),
    "maps and instances": ("detector.py", "analyse"),
    "files and lines": ("outputs.py", "write"),
}


def folder_of(data: Path, count: int, out: Path) -> Path:
    """``count`` images of ``data`` (every image under it but masks), cycled, as one folder."""
    found = [p for p, _ in collect_images([data]) if "ground_truth" not in p.parts]
    found = [p for p in found if p.parent.name != "mask" and not p.stem.endswith("_mask")]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = found[i % len(found)]
        shutil.copyfile(src, out / f"{i:05d}{src.suffix}")
    return out


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each stage of ``STAGES`` in the profile."""
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = dict.fromkeys(STAGES, 0.0)
    for (file, _, name), (_, _, _, cumulative, _) in stats.items():
        for stage, (suffix, fn) in STAGES.items():
            if file.endswith(suffix) and name == fn:
                out[stage] += cumulative
    return out


def timed_predict(
    ckpt: Path, images: Path, out: Path, runtime: str, files: bool, profiled: bool
) -> dict:
    """One predict run: wall seconds, images/s, and its stages (a second, profiled run)."""
    kw = {"runtime": runtime, "heatmaps": files, "masks": files, "progress": False}
    tic = time.perf_counter()
    kdad.predict(ckpt, [images], out / "timed", **kw)
    wall = time.perf_counter() - tic
    count = len(list(images.iterdir()))
    row = {"seconds": wall, "images_per_s": count / wall}
    if profiled:
        profile = cProfile.Profile()
        profile.enable()
        kdad.predict(ckpt, [images], out / "profiled", **kw)
        profile.disable()
        row["stages"] = stage_seconds(profile)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/battery-weld/welding")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runtimes", nargs="+", default=["pytorch", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true", help="no second, profiled run")
    ap.add_argument("--out", default="bench/results/predict_speed.json")
    args = ap.parse_args()

    peak = matmul_peak(args.threads)
    print(f"matmul peak: {peak:.1f} GFLOP/s on {args.threads} threads")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = folder_of(Path(args.data), args.count, Path(tmp) / "images")
        for name in args.models:
            run = Path(tmp) / name
            # DeST-DDPM: Perlin defects (no DDPM to train) and 2 epochs, so that its head's phase,
            # which calibrates, is reached (with 1, predict has no decisions, masks, instances)
            dest = name == "dest_ddpm"
            ckpt = kdad.train(
                data=args.data,
                model=name,
                epochs=2 if dest else 1,
                options={"defects": "perlin"} if dest else None,
                out=run,
                progress=False,
            )
            torch.set_num_threads(args.threads)
            det = kdad.load(ckpt, device="cpu")
            det.predict(sorted(images.iterdir())[:2])  # the graph written and cached
            h, w = det.dataset([]).size
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                det.model.eval()(torch.randn(1, 3, h, w))
            gflops = counter.get_total_flops() / 1e9
            row = {"gflops_per_image": gflops, "input": [h, w]}
            for runtime in args.runtimes:
                for mode, files in (("scoring", False), ("default", True)):
                    r = timed_predict(
                        ckpt, images, run / runtime / mode, runtime, files, not args.no_profile
                    )
                    r["share_of_peak"] = gflops * r["images_per_s"] / peak
                    row[f"{runtime}/{mode}"] = r
                    print(name, runtime, mode, {k: v for k, v in r.items() if k != "stages"})
                    if "stages" in r:
                        print("   ", {k: round(v, 2) for k, v in r["stages"].items()})
            rows[name] = row
    write_result(
        args.out,
        {
            "benchmark": "predict_speed",
            "settings": vars(args),
            "matmul_peak_gflops": peak,
            "models": rows,
        },
    )


if __name__ == "__main__":
    main()
