"""`kdad demo`: generated washers, the default model trained on the good ones, tested, predicted
and reported, with no data of one's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdad.cli import main
from kdad.data.demo_parts import DEFECTS, add_defect, washer, write_demo_set
from kdad.data.io import read_image, read_mask
from kdad.data.layouts import find_samples


def test_the_generated_defects_are_where_their_masks_say() -> None:
    rng = np.random.default_rng(3)
    for kind in DEFECTS:
        for _ in range(5):
            img, metal = washer(rng, 128)
            bad, mask = add_defect(rng, img, metal, kind)
            assert mask.any() and (mask <= metal).all()  # on the part, never the background
            changed = np.abs(bad - img) > 0.05
            assert (changed == mask).mean() > 0.99  # the label is what changed
    with pytest.raises(ValueError, match="unknown defect"):
        add_defect(rng, *washer(rng, 64), "rust")


def test_the_demo_set_reads_as_a_users_mvtec_folder(tmp_path: Path) -> None:
    root = write_demo_set(tmp_path / "data", n_train=3, n_good=2, n_bad=2, size=64)
    assert len(find_samples(root, "train", "mvtec")) == 3
    test = find_samples(root, "test", "mvtec")
    assert len(test) == 2 + 2 * len(DEFECTS)
    for s in test:
        assert read_image(s.path).shape == (64, 64, 3)
        assert (s.mask is None) == (s.label == 0)
        if s.mask is not None:
            assert read_mask(s.mask).any()


def test_kdad_demo_trains_tests_predicts_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for part in ("image_auroc", "verdicts", "good", "scratch", "report:", "predictions:"):
        assert part in text
    assert (out / "run" / "report.html").is_file() and (out / "run" / "metrics.json").is_file()
    assert len(list((out / "predictions" / "heatmaps").rglob("*.png"))) == 15 + 5 * len(DEFECTS)
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2  # the same folder again
    assert "exists" in capsys.readouterr().err
