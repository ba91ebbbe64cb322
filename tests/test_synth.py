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


def _full_grid_perlin(size: int, res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise computed the plain way, over a full (n, n) lattice of gradients."""
    n = -(-size // max(res)) * max(res)
    ry, rx = res
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    y, x = np.mgrid[0:n, 0:n] + 0.5
    gy, gx = y * ry / n, x * rx / n
    iy, ix = gy.astype(int), gx.astype(int)
    fy, fx = gy - iy, gx - ix

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grad[iy + dy, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = (6 * t**5 - 15 * t**4 + 10 * t**3 for t in (fy, fx))
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return (np.sqrt(2) * (top * (1 - uy) + bottom * uy))[:size, :size]


def test_separable_perlin_noise_is_the_full_lattices() -> None:
    """``perlin_noise`` builds its lattice per row and per column and repeats each cell's
    gradients: the noise of the plain full-lattice computation, for every scale and size."""
    for i, size in enumerate([32, 100, 256, 333]):
        for ry in (1, 4, 32):
            for rx in (1, 2, 16):
                seed = [i, ry, rx]
                got = perlin_noise(size, (ry, rx), np.random.default_rng(seed))
                want = _full_grid_perlin(size, (ry, rx), np.random.default_rng(seed))
                assert got.shape == want.shape == (size, size)
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
