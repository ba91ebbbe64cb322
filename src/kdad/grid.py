"""``kdad bench``: a grid of runs (models x datasets or categories x seeds) from one YAML file,
summarised as a Markdown table and a CSV with mean +- std over seeds.

A finished run (its metrics.json exists) is never redone, and an interrupted one resumes from
its last epoch: running the same grid again completes it. ``--models`` runs only some rows
first; the tables always hold every finished run, with the number of seeds each row averages.
``--jobs N`` runs N runs at once in separate processes, the cores shared between them.

    out: runs/grid
    seeds: [0, 1, 2]
    train: {epochs: 30, image_size: 256}        # any kdad.train keyword, for every run
    datasets:
      - {name: mtd, path: ../shared/data/magnetic-tile}
      - {name: mvtec, path: /data/mvtec, categories: [bottle, screw]}
    models:
      - {name: rd-lite0, model: rd, backbone: efficientnet_lite0}
      - {name: rd-wrn50, model: rd, backbone: wide_resnet50_2, options: {sigma: 4}}
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kdad.config import OVERRIDES, LaunchConfig, RunConfig, apply_overrides
from kdad.engine.checkpoint import load_checkpoint
from kdad.engine.pool import run_parallel
from kdad.errors import KdadError
from kdad.files import atomic_write
from kdad.metrics import METRIC_NAMES

_RUN_KEYS = {"name", "model", "backbone", "stages", "options"}


@dataclass
class Job:
    """One run of the grid."""

    model: dict[str, Any]
    dataset: dict[str, Any]
    category: str | None
    seed: int
    out: Path

    @property
    def row(self) -> tuple[str, str]:
        """The table row this run averages into: (model, dataset[/category])."""
        data = self.dataset["name"] + (f"/{self.category}" if self.category else "")
        return self.model["name"], data


@dataclass
class Grid:
    """The parsed grid file."""

    out: Path
    seeds: list[int]
    train: dict[str, Any]
    datasets: list[dict[str, Any]]
    models: list[dict[str, Any]]
    jobs: list[Job] = field(default_factory=list)


def _check(items: Any, what: str, where: str, allowed: set[str]) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not items:
        raise KdadError(f"{where}: '{what}' must be a non-empty list")
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            raise KdadError(f"{where}: every entry of '{what}' needs a name")
        bad = set(item) - allowed
        if bad:
            raise KdadError(f"{where}: {what} {item['name']!r} has unknown key {sorted(bad)[0]!r}")
    return items


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file; every problem is one line naming the file."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise KdadError(f"{path}: cannot read grid ({str(e).splitlines()[0]})") from e
    bad = set(d) - {"out", "seeds", "train", "datasets", "models"}
    if bad:
        raise KdadError(f"{path}: unknown key {sorted(bad)[0]!r}")
    train = d.get("train") or {}
    bad = set(train) - (
        set(OVERRIDES)
        - {"data", "layout", "category", "out", "seed", "model", "backbone", "stages", "options"}
    )
    if bad:
        raise KdadError(f"{path}: train has unknown or per-run key {sorted(bad)[0]!r}")
    grid = Grid(
        out=Path(d.get("out", "runs/grid")),
        seeds=[int(s) for s in d.get("seeds", [0])],
        train=train,
        datasets=_check(
            d.get("datasets"), "datasets", str(path), {"name", "path", "layout", "categories"}
        ),
        models=_check(d.get("models"), "models", str(path), _RUN_KEYS),
    )
    for m in grid.models:
        for ds in grid.datasets:
            for cat in ds.get("categories") or [None]:
                for seed in grid.seeds:
                    sub = ds["name"] + (f"-{cat}" if cat else "")
                    out = grid.out / m["name"] / sub / f"seed{seed}"
                    grid.jobs.append(Job(m, ds, cat, seed, out))
    return grid


def run_job(job: Job, train: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; returns its summary (also in metrics.json)."""
    from kdad.data.dataset import AUTO
    from kdad.engine import choose
    from kdad.protocol import evaluate

    done = job.out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = apply_overrides(
        RunConfig(),
        data=job.dataset["path"],
        layout=job.dataset.get("layout"),
        category=job.category,
        model=job.model.get("model", "rd"),
        backbone=job.model.get("backbone"),
        stages=job.model.get("stages"),
        seed=job.seed,
        out=job.out,
        **train,
    )
    cfg.model.options = dict(job.model.get("options") or {})
    resume = (job.out / "checkpoint.pt").is_file()
    auto = cfg.model.name == AUTO  # a choice under way leaves no checkpoint.pt in the run
    ckpt = choose.train(cfg, resume=resume or (auto and job.out.is_dir()), progress=progress)
    state = load_checkpoint(job.out / "checkpoint.pt")
    res = evaluate(ckpt, out=None)
    res["training"] = {
        "seconds": sum(h["seconds"] for h in state["history"]),
        "epochs": state["epoch"],
        "best": state.get("best"),
    }
    res["images_per_second"] = res["counts"]["images"] / res["inference_seconds"]
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps(res, indent=2)))
    return res


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else None


def summarise(grid: Grid, results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dataset): mean and std over seeds of every metric and cost, and the
    image AUROC of each defect class alone against the good images (``per_class``). Metrics are
    those of the subset of the test set that its layout reports where it declares one
    (Magnetic Tile: the final half; settings are chosen on the dev half), else of the whole."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, job in enumerate(grid.jobs):
        if i in results:
            rows.setdefault(job.row, []).append(results[i])
    table = []
    for (model, data), runs in rows.items():
        reported = {r.get("reported", "") for r in runs}
        part = reported.pop() if len(reported) == 1 else ""  # seeds must agree, else the whole
        parts = [r["subsets"][part] if part else r for r in runs]
        row: dict[str, Any] = {"model": model, "data": data, "seeds": len(runs)}
        row["test"] = part or "all"
        for m in METRIC_NAMES:
            row[m] = _mean_std([p["metrics"][m] for p in parts])
        classes = [p.get("image_auroc_per_class", {}) for p in parts]
        names = sorted({c for pc in classes for c in pc})
        row["per_class"] = {c: _mean_std([pc.get(c) for pc in classes]) for c in names}
        row["val"] = _mean_std([(r["training"]["best"] or {}).get("value") for r in runs])
        row["train_s"] = _mean_std([r["training"]["seconds"] for r in runs])
        row["img_per_s"] = _mean_std([r["images_per_second"] for r in runs])
        table.append(row)
    return table


def _fmt(ms: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None:
        return "n/a"
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def _value(row: dict[str, Any], col: str) -> tuple[float, float] | None:
    """A table row's (mean, std) in column ``col``; ``image_auroc:<class>`` reads per_class."""
    if col.startswith("image_auroc:"):
        return row.get("per_class", {}).get(col.split(":", 1)[1])
    return row[col]


def _csv(ms: tuple[float, float] | None, k: int) -> str:
    return "" if ms is None else f"{ms[k]:.6g}"


def write_tables(table: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """results.md (metrics in %, mean ± std over seeds) and results.csv (raw fractions). Rows
    with per-class image AUROC add one column per class: ``image_auroc:<class>``."""
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted({c for r in table for c in r.get("per_class", {})})
    per_class = [f"image_auroc:{c}" for c in classes]
    head = ["model", "data", "seeds", "test", *METRIC_NAMES, *per_class]
    head += ["val (select)", "train s", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [
            r["model"],
            r["data"],
            str(r["seeds"]),
            r["test"],
            *(_fmt(r[m]) for m in METRIC_NAMES),
            *(_fmt(_value(r, c)) for c in per_class),
            _fmt(r["val"]),
            _fmt(r["train_s"], 1, 0),
            _fmt(r["img_per_s"], 1, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md = out / "results.md"
    atomic_write(md, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    path = out / "results.csv"

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            cols = [*METRIC_NAMES, *per_class, "val", "train_s", "img_per_s"]
            w.writerow(
                ["model", "data", "seeds", "test"]
                + [f"{c}_{s}" for c in cols for s in ("mean", "std")]
            )
            for r in table:
                w.writerow(
                    [
                        r["model"],
                        r["data"],
                        r["seeds"],
                        r["test"],
                        *[_csv(_value(r, c), k) for c in cols for k in (0, 1)],
                    ]
                )

    atomic_write(path, write_csv)
    return md, path


def _run(args: tuple[Job, dict[str, Any], bool]) -> dict[str, Any]:
    return run_job(*args)


def run_grid(
    path: str | Path,
    progress: bool = True,
    models: list[str] | None = None,
    jobs: int = LaunchConfig.jobs,
    seeds: list[int] | None = None,
) -> tuple[Path, Path]:
    """Run every job of the grid not yet finished (only those of ``models``, by name, and of
    ``seeds``, when given), ``jobs`` at a time in separate processes, then tabulate every
    finished run of the grid, whichever call ran it. A run that fails (bad data, say) does not
    stop the others: the tables are written, then the failures are raised together."""
    grid = load_grid(path)
    names = [m["name"] for m in grid.models]
    unknown = sorted(set(models or []) - set(names))
    if unknown:
        raise KdadError(f"{path}: no model {unknown[0]!r} in the grid; models: {', '.join(names)}")
    absent = sorted(set(seeds or []) - set(grid.seeds))
    if absent:
        listed = ", ".join(map(str, grid.seeds))
        raise KdadError(f"{path}: no seed {absent[0]} in the grid; seeds: {listed}")
    results, todo = {}, []
    for i, job in enumerate(grid.jobs):
        done = job.out / "metrics.json"
        if done.is_file():
            results[i] = json.loads(done.read_text())
        elif (not models or job.model["name"] in models) and (not seeds or job.seed in seeds):
            todo.append(i)

    def describe(args: tuple[Job, dict[str, Any], bool]) -> str:
        model, data = args[0].row
        return f"{model} on {data}, seed {args[0].seed} ({args[0].out})"

    bars = progress and jobs == 1
    ran, failed = run_parallel(
        _run,
        [(grid.jobs[i], grid.train, bars) for i in todo],
        jobs,
        describe,
        print if progress else None,
    )
    results.update({todo[k]: r for k, r in ran.items()})
    tables = write_tables(summarise(grid, results), grid.out)
    if failed:
        lines = [f"{grid.jobs[todo[k]].out}: {e}" for k, e in failed.items()]
        raise KdadError(f"{len(failed)} of {len(todo)} runs failed; first: {lines[0]}")
    return tables
