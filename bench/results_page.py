"""Write docs/results.md from the benchmarks' results files listed in bench/results_index.yaml:
one table per dataset, every model as mean ± std over its seeds (on the subset the dataset
reports), training time and images/s where the runs had the machine to themselves, and the
published references with their sources. Nothing in the page is typed by hand.

    python bench/results_page.py            # writes docs/results.md
    python bench/results_page.py --check    # fails if docs/results.md is not what it would write
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "bench" / "results_index.yaml"
PAGE = ROOT / "docs" / "results.md"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "iap")
HEAD = ("image AUROC", "pixel AUROC", "AUPRO", "pixel AP", "IAP")


def _machine(m: Any) -> str:
    """A results file's machine, in words."""
    if isinstance(m, dict):
        return f"{m.get('cpus')} CPUs"
    return str(m).split(",")[0]


def _per_second(v: Any) -> float | None:
    """images/s of a results file: a number, or the batch-16 figure of a dict."""
    return v.get("batch16") if isinstance(v, dict) else v


def _runs(row: dict[str, Any], subset: str) -> list[dict[str, Any]]:
    """One dict per run of a row's sources: metrics, seconds, images/s, machine."""
    runs = []
    for path in sorted(glob.glob(str(ROOT / row["files"]))) if "files" in row else []:
        d = json.loads(Path(path).read_text())
        part = d[row["part"]] if "part" in row else d
        parts = part.get("subsets") or part.get("halves") or {}
        metrics = parts[subset]["metrics"] if subset else part["metrics"]
        runs.append(
            {
                "metrics": metrics,
                "seconds": d.get("train_wall_seconds"),
                "images_per_second": _per_second(d.get("images_per_second")),
                "machine": _machine(d.get("machine")),
            }
        )
    grids = row.get("grid", [])
    for path in [grids] if isinstance(grids, str) else grids:
        d = json.loads((ROOT / path).read_text())
        for r in d["runs"]:
            if r["model"] == row["model"]:
                metrics = r["halves"][subset]["metrics"] if subset else r["metrics"]
                runs.append(
                    {
                        "metrics": metrics,
                        "seconds": r.get("seconds"),
                        "images_per_second": None,
                        "machine": _machine(d["machine"]),
                    }
                )
    return runs


def _cell(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    v = [x * scale for x in values if x is not None]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}"


def _csv_row(row: dict[str, Any]) -> list[str]:
    """A row from a `kdad bench` results.csv (means and stds already)."""
    with open(ROOT / row["csv"], newline="") as f:
        r = next(x for x in csv.DictReader(f) if x["model"] == row["model"])
    cells = [r["seeds"]]
    for m in METRICS:
        mean, std = float(r[f"{m}_mean"]) * 100, float(r[f"{m}_std"]) * 100
        cells.append(f"{mean:.1f} ± {std:.1f}")
    cost = row.get("cost", True)
    cells.append(f"{float(r['train_s_mean']) / 60:.1f}" if cost else "-")
    cells.append(f"{float(r['img_per_s_mean']):.1f}" if cost else "-")
    cells.append(row.get("machine", "see docs/benchmarks.md"))
    cells.append(row["csv"])
    return cells


def _row(row: dict[str, Any], subset: str) -> list[str]:
    if "csv" in row:
        return _csv_row(row)
    runs = _runs(row, subset)
    if not runs:
        raise SystemExit(f"{INDEX}: row {row['name']!r} found no runs")
    cells = [str(len(runs))]
    cells += [_cell([r["metrics"][m] for r in runs]) for m in METRICS]
    cost = row.get("cost", True)
    if "cost_files" in row:  # the same training, timed alone in other runs
        runs = _runs({"files": row["cost_files"]}, subset)
    minutes = [r["seconds"] / 60 if r["seconds"] else None for r in runs]
    cells.append(_cell(minutes, 1, 1) if cost else "-")
    cells.append(_cell([r["images_per_second"] for r in runs], 1, 1) if cost else "-")
    cells.append("; ".join(sorted({r["machine"] for r in runs})))
    sources = row.get("files") or row["grid"]
    text = ", ".join([sources] if isinstance(sources, str) else sources)
    cells.append(text + (f" (time: {row['cost_files']})" if "cost_files" in row else ""))
    return cells


def page() -> str:
    index = yaml.safe_load(INDEX.read_text())
    out = [
        "# Results",
        "",
        "Every kdad model on the datasets kdad holds: mean ± std over seeds (the seeds column), "
        "in %. Written by `python bench/results_page.py` from the results files named in "
        "`bench/results_index.yaml`; how each was run, and everything else measured, is in "
        "docs/benchmarks.md (the research log). Train minutes and images/s are shown only "
        "where the runs had the machine to themselves; '-' where they shared it.",
    ]
    cols = ("model", "seeds", *HEAD, "train min", "images/s", "machine", "results files")
    for ds in index["datasets"]:
        out += ["", f"## {ds['name']}", "", f"{ds['note']}.", ""]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in ds["rows"]:
            out.append(f"| {row['name']} | " + " | ".join(_row(row, ds["subset"])) + " |")
        if ds["references"]:
            out += ["", "Published references:", ""]
            out += ["| method | " + " | ".join(HEAD) + " | source |", "|" + "---|" * 7]
            for ref in ds["references"]:
                vals = [f"{ref[m]:.1f}" if m in ref else "n/a" for m in METRICS]
                out.append(f"| {ref['name']} | " + " | ".join(vals) + f" | {ref['source']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args()
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            sys.exit(f"{PAGE} is not what bench/results_page.py writes: run it")
        return
    PAGE.write_text(text)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
