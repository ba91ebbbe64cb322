"""`kdad bench`: a grid of runs, tables with mean ± std over seeds, finished runs never redone."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
from conftest import make_folder, make_mvtec

from kdad.cli import main
from kdad.engine.checkpoint import load_checkpoint
from kdad.errors import KdadError
from kdad.grid import load_grid, summarise, write_tables
from kdad.metrics import METRIC_NAMES


def _grid(tmp_path: Path) -> Path:
    a = make_mvtec(tmp_path / "a", n_train=6)
    b = make_folder(tmp_path / "b")
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"out: {tmp_path / 'runs'}\n"
        "seeds: [0, 1]\n"
        "train: {epochs: 1, batch_size: 4, image_size: 32, val_every: 1}\n"
        f"datasets:\n  - {{name: A, path: {a}}}\n  - {{name: B, path: {b}, layout: folder}}\n"
        "models:\n  - {name: rd-lite0, model: rd, backbone: efficientnet_lite0}\n"
        "  - {name: iig, model: iig_rd, options: {prototypes: 4}}\n"
    )
    return grid


def test_grid_runs_tabulates_and_resumes(tmp_path: Path, capsys) -> None:
    grid = _grid(tmp_path)
    out = tmp_path / "runs"
    assert main(["bench", str(grid), "--no-progress", "--models", "rd-lite0", "--seeds", "1"]) == 0
    assert sorted(p.parent.name for p in out.rglob("metrics.json")) == ["seed1", "seed1"]
    with open(out / "results.csv", newline="") as f:  # one seed of each dataset so far
        assert [(r["data"], r["seeds"]) for r in csv.DictReader(f)] == [("A", "1"), ("B", "1")]
    assert main(["bench", str(grid), "--no-progress", "--models", "rd-lite0"]) == 0
    assert not (out / "iig").exists()  # only the rows asked for ran
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["data"], r["seeds"]) for r in rows] == [
        ("rd-lite0", "A", "2"),
        ("rd-lite0", "B", "2"),
    ]
    for r in rows:
        runs = [
            json.loads((out / "rd-lite0" / r["data"] / f"seed{s}" / "metrics.json").read_text())
            for s in (0, 1)
        ]
        aurocs = [x["metrics"]["image_auroc"] for x in runs]
        assert float(r["image_auroc_mean"]) == pytest.approx(sum(aurocs) / 2, abs=1e-5)
        assert float(r["img_per_s_mean"]) > 0 and float(r["train_s_mean"]) > 0
    md = (out / "results.md").read_text()
    assert md.startswith("| model | data | seeds | test | image_auroc") and " ± " in md
    assert {r["test"] for r in rows} == {"all"}  # no dev/final split: the whole test set

    # Run again: nothing is redone; delete one result: only that run is done again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    redo = out / "rd-lite0" / "B" / "seed1"
    (redo / "metrics.json").unlink()
    assert main(["bench", str(grid), "--no-progress", "--models", "rd-lite0"]) == 0
    changed = [p for p in out.rglob("checkpoint.pt") if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [] and (redo / "metrics.json").is_file()  # finished run: evaluated only

    # The whole grid: the other row runs, the first stays in the tables.
    assert main(["bench", str(grid), "--no-progress"]) == 0
    with open(out / "results.csv", newline="") as f:
        assert [(r["model"], r["data"]) for r in csv.DictReader(f)] == [
            ("rd-lite0", "A"),
            ("rd-lite0", "B"),
            ("iig", "A"),
            ("iig", "B"),
        ]
    capsys.readouterr()
    assert main(["bench", str(grid), "--models", "nope"]) == 2
    assert "no model 'nope' in the grid" in capsys.readouterr().err
    assert main(["bench", str(grid), "--seeds", "7"]) == 2
    assert "no seed 7 in the grid; seeds: 0, 1" in capsys.readouterr().err


def test_rows_report_the_subset_the_layout_reports_where_it_declares_one(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    run = {"training": {"best": None, "seconds": 1.0}, "images_per_second": 2.0}
    whole = {m: 0.5 for m in METRIC_NAMES}

    def halves(crack: float) -> dict:
        per_class = {"dev": {"Crack": 0.2}, "final": {"Crack": crack, "Fray": 0.7}}
        subsets = {
            h: {"metrics": {m: v for m in METRIC_NAMES}, "image_auroc_per_class": per_class[h]}
            for h, v in (("dev", 0.1), ("final", 0.9))
        }
        return {"subsets": subsets, "reported": "final"}

    results = {0: {**run, "metrics": whole, **halves(0.8)}, 1: {**run, "metrics": whole}}
    results[2] = {**run, "metrics": whole, **halves(0.8)}
    results[3] = {**run, "metrics": whole, **halves(0.6)}
    table = summarise(grid, results)
    assert [(r["data"], r["test"], r["image_auroc"][0]) for r in table] == [
        ("A", "all", 0.5),  # one seed without subsets: the whole test set for the row
        ("B", "final", 0.9),
    ]
    assert table[0]["per_class"] == {}
    assert table[1]["per_class"]["Crack"] == pytest.approx((0.7, 0.1))  # final half, 2 seeds
    md, csv_path = write_tables(table, tmp_path / "tables")
    head, _, row_a, row_b = md.read_text().splitlines()
    assert "image_auroc:Crack" in head and "image_auroc:Fray" in head
    assert "70.0 ± 10.0" in row_b and "n/a" in row_a
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["image_auroc:Fray_mean"]) == pytest.approx(0.7)
    assert rows[0]["image_auroc:Crack_mean"] == ""


def test_bad_grid_files(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("datasets: []\nmodels: [{name: x}]\n")
    with pytest.raises(KdadError, match="'datasets' must be a non-empty list"):
        load_grid(grid)
    grid.write_text("datasets: [{name: a, path: p}]\nmodels: [{name: x, colour: red}]\n")
    with pytest.raises(KdadError, match="unknown key 'colour'"):
        load_grid(grid)
    grid.write_text("datasets: [{name: a, path: p}]\nmodels: [{name: x}]\ntrain: {out: y}\n")
    with pytest.raises(KdadError, match="per-run key 'out'"):
        load_grid(grid)


def _interval(run: Path) -> tuple[int, int]:
    """When a run was written: its config (start) to its metrics (end)."""
    return (run / "config.yaml").stat().st_mtime_ns, (run / "metrics.json").stat().st_mtime_ns


@pytest.mark.slow
def test_grid_runs_in_parallel_keeps_going_past_a_failure_and_resumes(
    tmp_path: Path, capsys
) -> None:
    """--jobs 2: runs overlap in time; a dataset that does not exist fails its runs only; the
    finished runs are tabulated and never redone."""
    a = make_mvtec(tmp_path / "a", n_train=6)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"out: {tmp_path / 'runs'}\nseeds: [0, 1, 2]\n"
        "train: {epochs: 2, batch_size: 4, image_size: 32, val_every: 1}\n"
        f"datasets:\n  - {{name: A, path: {a}}}\n  - {{name: gone, path: {tmp_path / 'gone'}}}\n"
        "models:\n  - {name: rd, model: rd}\n"
    )
    assert main(["bench", str(grid), "--no-progress", "--jobs", "2"]) == 2
    assert "3 of 6 runs failed" in capsys.readouterr().err
    runs = [tmp_path / "runs" / "rd" / "A" / f"seed{s}" for s in range(3)]
    spans = sorted(_interval(r) for r in runs)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))  # two at once
    with open(tmp_path / "runs" / "results.csv", newline="") as f:
        assert [(r["model"], r["data"], r["seeds"]) for r in csv.DictReader(f)] == [
            ("rd", "A", "3")
        ]
    stamps = {r: (r / "checkpoint.pt").stat().st_mtime_ns for r in runs}
    assert main(["bench", str(grid), "--no-progress", "--jobs", "2", "--models", "rd"]) == 2
    assert all((r / "checkpoint.pt").stat().st_mtime_ns == t for r, t in stamps.items())


@pytest.mark.slow
def test_train_several_categories_in_parallel(tmp_path: Path, capsys) -> None:
    """``kdad train --category c1 c2 --jobs 2``: one run per category in OUT/<category>;
    again with --resume nothing is redone; without, each existing run is refused."""
    root = tmp_path / "mvtec"
    for i, cat in enumerate(["bottle", "screw"]):
        make_mvtec(root / cat, n_train=6, seed=i)
    out = tmp_path / "runs"
    args = ["train", "--data", str(root), "--category", "bottle", "screw", "--epochs", "1"]
    args += ["--image-size", "32", "--batch-size", "4", "--out", str(out), "--no-progress"]
    assert main([*args, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    for cat in ("bottle", "screw"):
        ckpt = load_checkpoint(out / cat / "checkpoint.pt")
        assert ckpt["config"]["data"]["category"] == cat and ckpt["epoch"] == 1
        assert f"checkpoint ({cat}):" in printed
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    assert main([*args, "--jobs", "2", "--resume"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert main(args) == 2
    assert "2 of 2 categories failed" in capsys.readouterr().err
    assert main([*args, "--nproc", "2"]) == 2
    assert "one torchrun each" in capsys.readouterr().err
