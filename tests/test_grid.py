"""`kdad bench`: a grid of runs, tables with mean ± std over seeds, finished runs never redone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import make_folder, make_mvtec

from kdad.cli import main
from kdad.errors import KdadError
from kdad.grid import load_grid


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
    assert main(["bench", str(grid), "--no-progress", "--models", "rd-lite0"]) == 0
    out = tmp_path / "runs"
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
    assert md.startswith("| model | data | seeds | image_auroc") and " ± " in md

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
