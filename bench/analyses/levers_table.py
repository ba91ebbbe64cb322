"""Markdown table of Magnetic Tile lever runs (bench/rd_mtd.py results): the dev half's metrics
and per-class image AUROC, epochs run and kept, and training time; one row per result file.

    python bench/analyses/levers_table.py bench/results/mtd_levers/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "iap")


def row(path: Path, half: str) -> str:
    r = json.loads(path.read_text())
    h = (r.get("subsets") or r["halves"])[half]  # "halves": files from before 2026-12-06
    m, pc = h["metrics"], h["image_auroc_per_class"]
    cells = [f"{100 * m[k]:.1f}" for k in METRICS] + [f"{100 * pc[c]:.0f}" for c in CLASSES]
    minutes = r["train_wall_seconds"] / 60
    return (
        f"| {path.stem} | "
        + " | ".join(cells)
        + (f" | {r['epochs_run']} / {r['kept_epoch']} | {minutes:.1f} |")
    )


def main() -> None:
    half = "dev"
    files = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    if "--final" in sys.argv:
        half = "final"
    head = ["run", "image AUROC", "pixel AUROC", "AUPRO", "pixel AP", "IAP", *CLASSES]
    print("| " + " | ".join(head) + " | epochs run / kept | train min |")
    print("|" + "---|" * (len(head) + 2))
    for f in files:
        print(row(f, half))


if __name__ == "__main__":
    main()
