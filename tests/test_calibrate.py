"""Calibration from good images only: thresholds, normalisation, and life without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

import kdad
from kdad.engine.calibrate import calibrate, f1_threshold, normalise
from kdad.errors import KdadError, KdadWarning


def test_thresholds_hit_their_targets() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    maps = rng.random((10, 32, 32)).astype(np.float32)
    c = calibrate(scores, maps, false_alarm_rate=0.05, pixel_quantile=0.99)
    assert np.mean(scores > c["image_threshold"]) == pytest.approx(0.05, abs=0.002)
    assert np.mean(maps > c["pixel_threshold"]) == pytest.approx(0.01, abs=0.001)
    assert c["image_low"] == pytest.approx(scores.min())


def test_normalisation_puts_threshold_at_half() -> None:
    v = np.array([0.0, 1.0, 2.0, 3.0, 9.0])
    assert normalise(v, threshold=2.0, low=1.0).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_f1_threshold_separates_labelled_sets() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = f1_threshold(scores, np.array([0, 0, 0, 1, 1, 1]))
    assert 0.3 < t <= 0.7
    with pytest.raises(KdadError, match="both good and defective"):
        f1_threshold(scores, np.zeros(6))


def test_checkpoint_without_calibration_still_predicts_raw(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "f", n_good=6)
    ckpt = kdad.train(
        model="rd",
        data=data / "good",
        epochs=1,
        batch_size=3,
        image_size=32,
        holdout=0,
        out=tmp_path / "r",
        progress=False,
    )
    assert ckpt.name == "checkpoint.pt"  # no validation, so no best.pt
    with pytest.warns(KdadWarning, match="has no calibration"):
        det = kdad.load(ckpt)
    p = det.predict([data / "defect" / "d0.png"])[0]
    assert p.score > 0 and p.decision is None and p.normalised_score is None
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad",
            "predict",
            "--checkpoint",
            str(ckpt),
            str(data / "defect"),
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stderr.count("has no calibration") == 1
    lines = [
        json.loads(x) for x in (tmp_path / "p" / "predictions.jsonl").read_text().split("\n") if x
    ]
    assert len(lines) == 3 and all(x["score"] > 0 and x["decision"] is None for x in lines)
    assert all((tmp_path / "p" / x["heatmap"]).is_file() and x["mask"] == "" for x in lines)


def _train_on_parts(tmp_path: Path, **settings) -> Path:
    """One epoch on 12 good parts, 4 of them held out for calibration."""
    data = make_folder(tmp_path / "f", n_good=12)
    return kdad.train(
        model="rd",
        data=data / "good",
        epochs=1,
        batch_size=4,
        image_size=32,
        holdout=0.34,
        out=tmp_path / "r",
        progress=False,
        **settings,
    )


def test_calibrated_checkpoint_flags_about_the_target_share(tmp_path: Path) -> None:
    ckpt = _train_on_parts(tmp_path, false_alarm_rate=0.25)
    det = kdad.load(ckpt)
    c = det.calibration
    assert c["images"] == 4 and c["false_alarm_rate"] == 0.25
    held = kdad.engine.checkpoint.load_checkpoint(ckpt)["holdout"]
    flagged = [p.decision == "defect" for p in det.predict(held)]
    assert sum(flagged) == 1  # 1 of the 4 held-out good images: the 25% asked for


def test_recalibrate_a_checkpoint(tmp_path: Path) -> None:
    ckpt = _train_on_parts(tmp_path)
    before = kdad.load(ckpt).calibration
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad",
            "calibrate",
            "--checkpoint",
            str(ckpt),
            "--false-alarm-rate",
            "0.5",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    after = kdad.load(ckpt).calibration
    assert json.loads(proc.stdout)["false_alarm_rate"] == 0.5 == after["false_alarm_rate"]
    assert after["image_threshold"] < before["image_threshold"]  # flags more
    assert after["pixel_threshold"] == pytest.approx(before["pixel_threshold"], rel=1e-5)


def test_f1_threshold_only_from_a_named_labelled_folder(tmp_path: Path) -> None:
    ckpt = _train_on_parts(tmp_path)
    labelled = make_folder(tmp_path / "val", n_good=5, n_bad=4, seed=9)
    det = kdad.load(ckpt)
    calibrated = det.calibration["image_threshold"]
    t = det.use_f1_threshold(labelled)
    files = sorted((labelled / "good").iterdir()) + sorted((labelled / "defect").iterdir())
    scores = np.array([p.score for p in det.predict(files)])
    labels = np.array([f.parent.name == "defect" for f in files])
    assert t == pytest.approx(f1_threshold(scores, labels)) and t != calibrated
    assert det.calibration["image_threshold_from"].startswith("F1 on")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad",
            "predict",
            "--checkpoint",
            str(ckpt),
            str(labelled / "good"),
            "--out",
            str(tmp_path / "p"),
            "--f1-threshold-from",
            str(labelled),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"image threshold (F1 on {labelled})" in proc.stdout
