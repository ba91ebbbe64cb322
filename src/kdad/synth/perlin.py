"""Synthetic defects from Perlin-noise masks (as DRAEM and DeSTSeg make them), without an
external texture set: the defect's content is a procedural Perlin texture or a transformed
patch of the image itself.

Everything is drawn from the ``numpy.random.Generator`` passed in, so a seed fixes the defect.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Perlin noise passes 0.8 on a few pixels only: above it a mask is tiny or takes long to draw
MAX_THRESHOLD = 0.8


def perlin_noise(size: int, res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise (size, size) in about [-1, 1], with ``res`` cells per axis."""
    cells = max(res)
    n = -(-size // cells) * cells  # a multiple of every res (powers of two)
    ry, rx = res
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)  # (ry+1, rx+1, 2)
    # the lattice is separable: per-row (n, 1) and per-column (1, n) terms, broadcast only
    # where they meet (the same values as a full (n, n) grid, a fraction of the work)
    y = np.arange(n)[:, None] + 0.5  # (n, 1)
    x = np.arange(n)[None, :] + 0.5  # (1, n)
    gy, gx = y * ry / n, x * rx / n
    iy, ix = gy.astype(int), gx.astype(int)
    fy, fx = gy - iy, gx - ix
    corner = [[grad[dy : dy + ry, :, k] for k in (0, 1)] for dy in (0, 1)]  # (ry, rx+1) each

    def dot(dy: int, dx: int) -> np.ndarray:
        # each cell's corner gradient, repeated over the cell's n / res pixels per axis
        g = [np.repeat(np.repeat(c, n // ry, 0)[:, dx : dx + rx], n // rx, 1) for c in corner[dy]]
        return g[0] * (fy - dy) + g[1] * (fx - dx)  # (n, n)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return (np.sqrt(2) * (top * (1 - uy) + bottom * uy))[:size, :size]


def perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5, max_scale: int = 6
) -> np.ndarray:
    """A binary defect mask of ``shape`` (H, W): thresholded Perlin noise of random scale
    2^0..2^(k-1) per axis, rotated by up to 90 degrees (drawn on the enclosing square, then
    cropped); never empty."""
    h, w = shape
    while True:
        res = tuple(int(2 ** rng.integers(0, max_scale)) for _ in range(2))
        noise = perlin_noise(max(h, w), res, rng)
        noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode="reflect")
        mask = noise[:h, :w] > threshold
        if mask.any():
            return mask


def perlin_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A procedural RGB texture (H, W, 3) in [0, 1]: coloured multi-octave Perlin noise."""
    h, w = shape
    base = rng.random(3)
    octaves = sum(
        perlin_noise(max(h, w), (2**k, 2**k), rng)[:h, :w] / 2 ** (k - 1)
        for k in range(1, rng.integers(3, 7))
    )
    tint = rng.uniform(-0.5, 0.5, 3)
    tex = base + octaves[..., None] * tint
    return np.clip(tex, 0, 1).astype(np.float32)


def self_texture(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image itself rolled, flipped and re-toned: foreign structure with the part's colours."""
    h, w = image.shape[:2]
    tex = np.roll(image, (rng.integers(h), rng.integers(w)), axis=(0, 1))
    tex = np.rot90(tex, rng.integers(4)) if h == w else tex
    tex = tex[::-1] if rng.random() < 0.5 else tex
    gain, offset = rng.uniform(0.6, 1.4), rng.uniform(-0.2, 0.2)
    return np.clip(tex * gain + offset, 0, 1).astype(np.float32)


def synthesize(
    image: np.ndarray, rng: np.random.Generator, beta_max: float = 0.8, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect on an (H, W, 3) float image: returns (image, mask (H, W) bool).

    The mask is Perlin noise above ``threshold`` (0.5, DRAEM's: 3-8% of the image; 0.1: about
    37%). Inside it the image is blended with a texture, ``(1 - b) texture + b image`` with
    opacity b drawn in [0, beta_max) (DRAEM's rule); outside it is unchanged.
    """
    shape = image.shape[:2]
    mask = perlin_mask(shape, rng, threshold)
    tex = perlin_texture(shape, rng) if rng.random() < 0.5 else self_texture(image, rng)
    r, g, b = (image[..., c] for c in range(3))  # channel planes: faster than a ptp over axis 2
    if (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).max() < 1e-6:
        # a gray part gets a gray defect
        tex = np.repeat(tex.mean(axis=2, keepdims=True), 3, axis=2)
    beta = rng.uniform(0, beta_max)
    blended = (1 - beta) * tex + beta * image
    out = np.where(mask[..., None], blended, image).astype(np.float32)
    return out, mask
