"""Markdown table of Magnetic Tile grid runs (`kdad bench` metrics.json files): one row per model,
mean ± std over its seeds of one half's metrics, per-class image AUROC and training minutes.

    python bench/seeds_table.py runs/mtd_*/*/magnetic-tile/seed*/metrics.json [--half dev]
        [--out runs.json --machine "H100, 16 cores"]

A run's model is the folder above its dataset's (runs/<grid>/<model>/<data>/seed<N>). ``--out``
keeps each run's halves and training time, with the machine it ran on, as a results file.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "iap")


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """Mean ± std (population) of ``values``, scaled; the mean alone for one value."""
    v = scale * np.asarray(values)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of grid runs")
    p.add_argument("--half", default="final", choices=("dev", "final"))
    p.add_argument("--out", type=Path, help="write the runs' halves and training time here")
    p.add_argument("--machine", default="", help="where the runs ran, kept in --out")
    args = p.parse_args()
    loaded = [(f, json.loads(f.read_text())) for f in args.metrics]
    runs: dict[str, list[dict]] = defaultdict(list)
    for f, r in loaded:
        runs[f.parts[-4]].append(r)
    if args.out:
        keep = [
            {
                "model": f.parts[-4],
                "seed": f.parts[-2],
                "halves": r.get("subsets") or r["halves"],
                **r["training"],
            }
            for f, r in loaded
        ]
        args.out.write_text(json.dumps({"machine": args.machine, "runs": keep}, indent=1))
    head = ["model", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "pixel AP", "IAP"]
    print("| " + " | ".join([*head, *CLASSES, "train min"]) + " |")
    print("|" + "---|" * (len(head) + len(CLASSES) + 1))
    for model, rs in runs.items():
        halves = [(r.get("subsets") or r["halves"])[args.half] for r in rs]
        cells = [cell([h["metrics"][k] for h in halves]) for k in METRICS]
        cells += [cell([h["image_auroc_per_class"][c] for h in halves], digits=0) for c in CLASSES]
        cells.append(cell([r["training"]["seconds"] for r in rs], scale=1 / 60, digits=0))
        print(f"| {model} | {len(rs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
