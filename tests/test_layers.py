"""Shared blocks: each one's defining property."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdad.models.layers import SSPCAB, SelectiveFusion, SimAM, pixel_cosine_loss


def test_selective_fusion_weights_sum_to_one_and_weight_the_sum() -> None:
    torch.manual_seed(0)
    sfm = SelectiveFusion(16, 3)
    xs = [torch.randn(2, 16, 4, 4) for _ in range(3)]
    w = sfm.weights(xs)
    assert w.shape == (2, 3, 16, 1, 1)
    assert torch.allclose(w.sum(1), torch.ones(2, 16, 1, 1))
    assert (w > 0).all() and w.std() > 0  # input-dependent, not a fixed average
    expected = w[:, 0] * xs[0] + w[:, 1] * xs[1] + w[:, 2] * xs[2]
    assert torch.allclose(sfm(xs), expected)
    same = torch.randn(2, 16, 4, 4)
    assert torch.allclose(sfm([same, same, same]), same, atol=1e-6)  # a convex combination


@pytest.mark.parametrize("kernel,dilation", [(1, 1), (2, 1), (1, 2)])
def test_sspcab_never_sees_the_masked_centre(kernel: int, dilation: int) -> None:
    """Changing any pixel of the (2 dilation + 1)^2 square around a position leaves the block's
    prediction of that position unchanged; a pixel under a corner kernel changes it."""
    torch.manual_seed(0)
    block = SSPCAB(4, kernel, dilation)
    x = torch.randn(1, 4, 13, 13)
    i = j = 6
    base = block.predict(x)[..., i, j]
    for di, dj in itertools.product(range(-dilation, dilation + 1), repeat=2):
        y = x.clone()
        y[..., i + di, j + dj] += 10.0
        assert torch.equal(block.predict(y)[..., i, j], base)
    y = x.clone()
    y[..., i - dilation - kernel, j - dilation - kernel] += 10.0  # under the top-left kernel
    assert not torch.equal(block.predict(y)[..., i, j], base)


def test_sspcab_keeps_shape_and_has_a_reconstruction_loss() -> None:
    block = SSPCAB(8)
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    loss = SSPCAB.loss(out, x)
    loss.backward()
    assert loss > 0 and all(p.grad is not None for p in block.parameters())


def test_simam_has_no_parameters_and_matches_its_closed_form() -> None:
    sim = SimAM(lam=1e-4)
    assert not list(sim.parameters()) and not list(sim.buffers())
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = sim(x)
    for b, c in itertools.product(range(2), range(3)):
        v = x[b, c].flatten()
        mu, var = v.mean(), v.var(unbiased=True)  # over the channel's H W positions
        for k, t in enumerate(v):
            energy = 4 * (var + 1e-4) / ((t - mu) ** 2 + 2 * var + 2 * 1e-4)
            assert torch.isclose(out[b, c].flatten()[k], t * torch.sigmoid(1 / energy))


def test_pixel_cosine_loss_is_zero_for_scaled_copies_and_two_for_opposites() -> None:
    t = torch.randn(2, 8, 4, 4)
    assert pixel_cosine_loss(t, 3 * t).abs() < 1e-6
    assert torch.isclose(pixel_cosine_loss(t, -t), torch.tensor(2.0))
