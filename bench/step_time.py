"""Benchmark: seconds of one training step of each candidate model, fp32 and bf16, on this
machine: what a fixed budget of steps costs in time.

A step is the student's forward, loss, backward and Adam update on a batch of 16 random
256x256 images, with the teacher's features given (as the training loop's cache does for plain
training images); the median of 4 steps after 2 warm-up steps. The candidates are a
``bench/many_runs.py`` file (its model, stages and options; data and schedule are ignored).

    python bench/step_time.py runs.yaml --out bench/results/defaults/step_time.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

from kdad.engine.distributed import native_bf16
from kdad.engine.teacher_cache import TeacherCache
from kdad.models import build_model


def step_seconds(spec: dict, precision: str, batch: int, side: int) -> float:
    """Median seconds of a training step of the model ``spec`` names."""
    torch.manual_seed(0)
    model = build_model(
        spec.get("model", "rd"),
        spec.get("backbone", "efficientnet_lite0"),
        spec.get("stages"),
        spec.get("options"),
        pretrained=False,
    ).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        cache = TeacherCache(model.teacher(x))  # the batch's features, handed over every step
    index = torch.arange(batch)
    params = [p for g in model.param_groups() for p in g["params"]]
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    times = []
    for _ in range(6):
        tic = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss({"image": x}, model(x, cache.features(index)))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[2:])


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
        rows[name] = {p: step_seconds(spec, p, args.batch, args.side) for p in ("fp32", "bf16")}
        print(name, {p: f"{s:.3f} s" for p, s in rows[name].items()}, flush=True)
    result = {
        "benchmark": "step_time",
        "settings": vars(args),
        "native_bf16": native_bf16(torch.device("cpu")),
        "seconds_per_step": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
