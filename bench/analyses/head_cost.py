"""What DeSTSeg's segmentation head costs on a CPU, by width: seconds per training step (forward
and backward of the head alone, as in the head phase) on one batch of teacher-student products
at a teacher's shallowest scale. DeSTSeg's width is 256; kdad's default 128.

    python bench/analyses/head_cost.py --out bench/results/head_cost.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
from common import write_result

from kdad.models import build_model
from kdad.models.seghead import SegHead


def step_seconds(head: SegHead, t: list[torch.Tensor], s: list[torch.Tensor], reps: int) -> float:
    """Median seconds of one forward and backward pass of ``head`` on (t, s)."""
    times = []
    for _ in range(reps + 1):  # the first warms up
        start = time.perf_counter()
        head.segment(t, s).sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[reps // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--stages", nargs="+", action="append", help="teacher stages (repeatable)")
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results/head_cost.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = []
    for stages in args.stages or [["stage2", "stage3", "stage5"], ["stage3", "stage5", "stage6"]]:
        teacher = build_model("rd", args.backbone, stages, pretrained=False).teacher.eval()
        with torch.no_grad():
            t = teacher(x)  # each (B, C_i, h_i, w_i)
        s = [torch.randn_like(f) for f in t]
        for width in args.widths:
            head = SegHead(teacher.channels, width).train()
            sec = step_seconds(head, t, s, args.reps)
            rows.append({"stages": stages, "width": width, "seconds_per_step": sec})
            print(f"{' '.join(stages)} width {width}: {sec:.3f} s a step of {args.batch_size}")
    write_result(args.out, {"benchmark": "head_cost", "settings": vars(args), "results": rows})


if __name__ == "__main__":
    main()
