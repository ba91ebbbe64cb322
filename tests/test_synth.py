"""Synthetic defects: Perlin masks of sensible size, deterministic, changing only the mask."""

from __future__ import annotations

import numpy as np

from kdad.synth.perlin import perlin_mask, perlin_noise, synthesize


def test_perlin_noise_range_and_smoothness() -> None:
    n = perlin_noise(64, (4, 4), np.random.default_rng(0))
    assert n.shape == (64, 64) and n.min() >= -1.01 and n.max() <= 1.01
    assert np.abs(np.diff(n, axis=1)).max() < 0.2  # continuous: neighbours differ little


def test_mask_statistics() -> None:
    rng = np.random.default_rng(0)
    fractions = np.array([perlin_mask((128, 128), rng).mean() for _ in range(100)])
    assert (fractions > 0).all()  # never empty
    assert 0.02 < fractions.mean() < 0.15  # defects, not whole images
    assert fractions.max() < 0.5
    assert len(np.unique(fractions.round(3))) > 50  # varied shapes and scales


def test_deterministic_under_seed() -> None:
    a = perlin_mask((64, 64), np.random.default_rng(3))
    b = perlin_mask((64, 64), np.random.default_rng(3))
    c = perlin_mask((64, 64), np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_synthesize_changes_only_the_mask_and_keeps_gray() -> None:
    img = np.repeat(np.random.default_rng(0).random((64, 64, 1), np.float32), 3, axis=2)
    for seed in range(10):
        out, mask = synthesize(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.float32 and mask.any()
        assert np.array_equal(out[~mask], img[~mask])
        assert np.abs(out[mask] - img[mask]).mean() > 0.005  # something visible changed
        assert np.ptp(out, axis=2).max() < 1e-6  # a gray part gets a gray defect
        assert out.min() >= 0 and out.max() <= 1
