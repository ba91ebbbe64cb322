"""Metrics: equal to scikit-learn where it has them, to hand-computed cases and to slow direct
implementations (written here) where it has not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from kdad import metrics as M


def _data(seed: int, n: int = 12, size: int = 24, levels: int = 0):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 3)):
            r, c = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, r : r + h, c : c + w] = True
    maps[masks] += rng.uniform(0, 0.6)
    if levels:  # ties, as quantised or saturated maps have
        maps = np.round(maps * levels) / levels
    return maps, masks


@pytest.mark.parametrize("levels", [0, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_and_image_metrics_equal_sklearn(seed: int, levels: int) -> None:
    maps, masks = _data(seed, levels=levels)
    curve = M.PixelCurve.build(maps, masks)
    assert curve.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert curve.ap() == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-6
    )
    p, r, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    assert curve.f1max()[0] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-12)), abs=1e-6)
    scores, labels = maps.max((1, 2)), masks.any((1, 2))
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert M.image_ap(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-6
    )


def _aupro_direct(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Threshold by threshold: FPR over good pixels, PRO as the mean overlap of each region."""
    regions = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[lab == k] for k in range(1, n + 1)]
    good = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(good >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs, ys = np.array(xs), np.array(ys)
    fine = np.linspace(0, limit, 200_001)  # dense linear interpolation, then integrate
    return float(np.trapezoid(np.interp(fine, xs, ys), fine) / limit)


@pytest.mark.parametrize("seed", [0, 3])
def test_aupro_matches_direct_implementation(seed: int) -> None:
    maps, masks = _data(seed, n=6, size=16)
    got = M.aupro(M.PixelCurve.build(maps, masks), masks)
    assert got == pytest.approx(_aupro_direct(maps, masks), abs=1e-4)


def test_aupro_hand_cases() -> None:
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True  # region A
    masks[1, 5:8, 5:8] = True  # region B
    maps = np.full(masks.shape, 0.5, np.float32)
    maps[masks] = 0.9  # both regions above every good pixel
    assert M.aupro(M.PixelCurve.build(maps, masks), masks) == pytest.approx(1.0)
    maps[1, 5:8, 5:8] = 0.1  # B below every good pixel: PRO is 1/2 until FPR 1
    assert M.aupro(M.PixelCurve.build(maps, masks), masks) == pytest.approx(0.5)
    # Regions weigh equally whatever their size; diagonal neighbours are one region.
    masks2 = np.zeros((1, 6, 6), bool)
    masks2[0, 0, 0] = masks2[0, 1, 1] = True
    assert M._regions(masks2)[1] == 1


def test_iap_hand_case() -> None:
    # One row: instance A (0.9, 0.9), good 0.7, good 0.1, instance B (0.5, 0.5), good 0.1 x4.
    row = np.array([0.9, 0.9, 0.7, 0.1, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1], np.float32)
    mask = np.array([1, 1, 0, 0, 1, 1, 0, 0, 0, 0], bool)
    maps, masks = row[None, None], mask[None, None]
    # t = 0.9: A found, 2 of 2 predicted pixels right; t = 0.5: both, 4 of 5 right.
    iap, iap90 = M.iap(M.PixelCurve.build(maps, masks), maps, masks)
    assert iap == pytest.approx((1.0 + 0.8) / 2) and iap90 == pytest.approx(0.8)
    # Half the pixels: a 3-pixel instance is found at its 2nd highest score.
    m3 = np.array([[[0.9, 0.6, 0.2]]], np.float32)
    assert M.instance_thresholds(m3, np.ones_like(m3, bool)).tolist() == [pytest.approx(0.6)]


def _iap_direct(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    inst = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        inst += [m[lab == k] for k in range(1, n + 1)]
    rec, prec = [], []
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        rec.append(np.mean([np.mean(r >= t) >= 0.5 for r in inst]))
        prec.append((pred & masks).sum() / pred.sum())
    rec, prec = np.array(rec), np.array(prec)
    n = len(inst)
    levels = np.arange(1, n + 1) / n
    p = np.array([prec[rec >= r - 1e-12].max() for r in levels])
    return float(p.mean()), float(p[int(np.ceil(0.9 * n)) - 1])


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_iap_matches_direct_implementation(seed: int) -> None:
    maps, masks = _data(seed, n=8, size=16, levels=20 if seed == 5 else 0)
    got = M.iap(M.PixelCurve.build(maps, masks), maps, masks)
    assert got == pytest.approx(_iap_direct(maps, masks), abs=1e-6)


def test_one_class_gives_none() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    res = M.compute_metrics(maps.max((1, 2)), np.zeros(3), maps, np.zeros(maps.shape, bool))
    assert res["image_auroc"] is None and res["pixel_auroc"] is None and res["aupro"] is None
