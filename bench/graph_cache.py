"""Benchmark: the seconds a model's first scoring spends on its ONNX graph (engine/runtime.py),
per model at the default backbone and 256x256: exported (a new architecture, the template kept),
filled from the template (a new checkpoint of a known architecture: another seed, a retrained
run), and found in the cache (the same checkpoint again). Each includes the check against
PyTorch. Weights do not change the cost: each model is built twice with random weights.

    python bench/graph_cache.py --out bench/results/graph_cache.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

from kdad.config import ModelConfig
from kdad.engine.runtime import cached_graph
from kdad.models import MODELS, build_model


def seconds(call: Callable[[], object]) -> float:
    """Wall seconds of ``call()``."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--backbone", default=ModelConfig.backbone)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--out", default="bench/results/graph_cache.json")
    args = ap.parse_args()
    hw = (args.image_size, args.image_size)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KDAD_CACHE"] = tmp
        templates = Path(tmp) / "graphs"
        for name in args.models:
            torch.manual_seed(0)
            first = build_model(name, args.backbone, pretrained=False).eval()
            torch.manual_seed(1)
            second = build_model(name, args.backbone, pretrained=False).eval()
            before = set(templates.glob("*.template.onnx"))
            row = {"exported_s": seconds(lambda m=first: cached_graph(m, hw))}
            (template,) = set(templates.glob("*.template.onnx")) - before
            row["from_template_s"] = seconds(lambda m=second: cached_graph(m, hw))
            row["cached_s"] = seconds(lambda m=second: cached_graph(m, hw))
            row["template_mb"] = template.stat().st_size / 2**20
            rows[name] = row
            print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)
    write_result(args.out, {"benchmark": "graph_cache", "settings": vars(args), "models": rows})


if __name__ == "__main__":
    main()
