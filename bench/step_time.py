"""Benchmark: seconds of one training step of each candidate model, in each of its training
phases, fp32 and bf16, on this machine: what a fixed budget of steps costs in time.

A step is the model's forward, loss, backward and Adam update on a batch of 16 random
256x256 images, drawn from the model's own training set (its synthetic defects, if it makes
them) with the teacher's features given as the training loop's cache gives them (for the
inputs, or for their clean versions); the median of 4 steps after 2 warm-up steps. The
candidates are a ``bench/many_runs.py`` file (its model, stages and options; data and schedule
are ignored).

    python bench/step_time.py runs.yaml --out bench/results/defaults/step_time.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

from kdad.backbones import get_spec
from kdad.data.dataset import TrainSet
from kdad.data.layouts import Sample
from kdad.engine.distributed import native_bf16
from kdad.engine.teacher_cache import build_cache
from kdad.models import build_model


def random_images(folder: Path, count: int, side: int) -> list[Sample]:
    """``count`` random RGB images of ``side`` px written to ``folder``, as good samples."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, 0))
    return samples


def phase_seconds(spec: dict, precision: str, batch: int, side: int) -> dict[str, float]:
    """Median seconds of a training step of the model ``spec`` names, per training phase."""
    torch.manual_seed(0)
    model = build_model(
        spec.get("model", "rd"),
        spec.get("backbone", "efficientnet_lite0"),
        spec.get("stages"),
        spec.get("options"),
        pretrained=False,
    ).to(memory_format=torch.channels_last)
    params = [p for g in model.param_groups() for p in g["params"]]
    opt = torch.optim.Adam(params, lr=1e-3)
    backbone = get_spec(spec.get("backbone", "efficientnet_lite0"))
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = TrainSet(random_images(Path(tmp), batch, side), side, backbone.mean, backbone.std)
        ds = model.train_set(images, Path(tmp), progress=False)
        cache = build_cache(model.teacher, ds, torch.device("cpu"), float("inf"))
        for name in dict.fromkeys(p.name for p in model.phases(100)):
            model.phase = name
            ds.set_epoch(0, name)
            data = next(iter(DataLoader(ds, batch_size=batch)))  # the same batch every step
            model.train()
            times = []
            for _ in range(6):
                b = dict(data)
                given = None if cache is None else cache.attach(b)
                x = b["image"].contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
                tic = time.perf_counter()
                with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                    loss = model.loss(b, model(x, given))["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - tic)
            seconds[name] = statistics.median(times[2:])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="a bench/many_runs.py YAML file: the candidates")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--out", default="bench/results/step_time.json")
    args = ap.parse_args()

    rows = {}
    for spec in yaml.safe_load(Path(args.runs).read_text()):
        name = spec["name"]
        rows[name] = {p: phase_seconds(spec, p, args.batch, args.side) for p in ("fp32", "bf16")}
        for p, phases in rows[name].items():
            print(name, p, {k: f"{s:.3f} s" for k, s in phases.items()}, flush=True)
    result = {
        "benchmark": "step_time",
        "settings": vars(args),
        "native_bf16": native_bf16(torch.device("cpu")),
        "seconds_per_step": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
