"""Benchmark: many training runs side by side, each trained, tested and written as one JSON.

Each run is a name, a seed and any ``kdad.train`` keywords (``data``, ``model``, ``stages``,
``options``, ``epochs``...) from a YAML list (and ``evaluate: last`` to test the last epoch
rather than ``best.pt``); runs start in the file's order, ``--jobs`` at a
time, the cores split between them. A run whose result file exists is skipped, so running the
same command again finishes an interrupted batch. Results: ``OUT/<name>-s<seed>.json`` with the
metrics (Magnetic Tile: each half's too), per-class image AUROC, training seconds and epochs,
and every synthetic validation of the run.

    python bench/many_runs.py runs.yaml --jobs 12 --out bench/results/defaults
    python bench/many_runs.py --table bench/results/defaults [--half dev]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result
from seeds_table import CLASSES, METRICS, cell

import kdad
from kdad.engine.pool import run_parallel


def one(job: dict[str, Any]) -> str:
    """Train, test and write one run; returns its result line."""
    settings, out, run_dir = job["settings"], Path(job["out"]), Path(job["run_dir"])
    tic = time.perf_counter()
    resume = (run_dir / "checkpoint.pt").exists()  # an interrupted run goes on
    settings = dict(settings)
    last = settings.pop("evaluate", "best") == "last"  # the fixed schedule's end, not best.pt
    ckpt = kdad.train(out=run_dir, seed=job["seed"], progress=False, resume=resume, **settings)
    train_seconds = time.perf_counter() - tic
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    if last:
        ckpt = run_dir / "checkpoint.pt"
    res = kdad.evaluate(ckpt, out=run_dir)
    result = {
        "benchmark": "many_runs",
        "name": job["name"],
        "seed": job["seed"],
        "settings": job["settings"],
        "checkpoint": Path(ckpt).name,
        "metrics": res["metrics"],
        "image_auroc_per_class": res["image_auroc_per_class"],
        "subsets": res["subsets"],
        "reported": res["reported"],
        "train_wall_seconds": train_seconds,
        "epochs_run": history[-1]["epoch"],
        "seconds_per_epoch": sorted(h["seconds"] for h in history)[len(history) // 2],
        "validation": [{"epoch": h["epoch"], **h["val"]} for h in history if "val" in h],
        "choice": json.loads(choice.read_text())
        if (choice := run_dir / "choice.json").is_file()
        else None,
        "protocol": res["protocol"],
    }
    write_result(out, result)
    m = res["subsets"].get("dev", {}).get("metrics") or res["metrics"]
    auroc = m["image_auroc"]
    return f"{job['name']} s{job['seed']}: image AUROC {auroc:.3f} ({train_seconds:.0f} s)"


def table(folder: Path, half: str) -> str:
    """Markdown: one row per run name in ``folder``, mean ± std over its seeds (Magnetic Tile:
    of ``half``, with each defect class's image AUROC), and training minutes."""
    rows: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["name"], []).append(r)
    for runs in rows.values():
        for r in runs:  # files from before the subsets were named so: "halves"
            r.setdefault("subsets", r.pop("halves", None) or {})
    mtd = any(r["subsets"] for runs in rows.values() for r in runs)
    head = ["run", "seeds", *METRICS, *(CLASSES if mtd else ()), "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in rows.items():
        parts = [r["subsets"][half] if r["subsets"] else r for r in runs]
        cells = [cell([p["metrics"][m] for p in parts]) for m in METRICS]
        if mtd:
            per = [p.get("image_auroc_per_class", {}) for p in parts]
            cells += [
                cell([q[c] for q in per], digits=0) if all(c in q for q in per) else "-"
                for c in CLASSES
            ]
        minutes = [r["train_wall_seconds"] / 60 for r in runs]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {cell(minutes, 1)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs",
        help="YAML list of {name, seeds, and kdad.train keywords}, or with "
        "--table the folder of results",
    )
    ap.add_argument("--table", action="store_true", help="print the table of a results folder")
    ap.add_argument("--half", default="dev", choices=("dev", "final"), help="with --table")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--run-dir", default="runs/many", help="where the run folders go")
    ap.add_argument("--out", default="bench/results/many_runs", help="where the results go")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.runs), args.half))
        return

    jobs = []
    for spec in yaml.safe_load(Path(args.runs).read_text()):
        spec = dict(spec)
        name, seeds = spec.pop("name"), spec.pop("seeds", [0])
        for seed in seeds:
            out = Path(args.out) / f"{name}-s{seed}.json"
            if not out.exists():
                run_dir = str(Path(args.run_dir) / f"{name}-s{seed}")
                jobs.append(dict(name=name, seed=seed, settings=spec, out=out, run_dir=run_dir))
    results, errors = run_parallel(one, jobs, args.jobs, lambda j: f"{j['name']} s{j['seed']}")
    for line in results.values():
        print(line, flush=True)
    print(json.dumps({"done": len(results), "failed": errors}, default=str))


if __name__ == "__main__":
    main()
