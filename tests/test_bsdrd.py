"""BSDRD: the Haar transform, the gate, and every switch of the model."""

from __future__ import annotations

import pytest
import torch

from kdad.errors import KdadError
from kdad.models import build_model
from kdad.models.layers import GatedFusion, haar_dwt


def test_haar_is_orthonormal_and_matches_its_formula() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    ll, lh, hl, hh = (b.item() for b in haar_dwt(x))
    assert (ll, lh, hl, hh) == (5.0, -2.0, -1.0, 0.0)
    y = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    energy = sum((b**2).sum() for b in haar_dwt(y))
    assert torch.allclose(energy, (y**2).sum())  # orthonormal: energy is kept
    assert haar_dwt(torch.randn(1, 1, 7, 5))[0].shape == (1, 1, 4, 3)  # odd sizes padded
    z = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: haar_dwt(v)[3], (z,))


def test_gated_fusion_starts_as_the_average() -> None:
    a, b = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    assert torch.allclose(GatedFusion(8)(a, b), (a + b) / 2)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"detail": False},
        {"gated_fusion": False},
        {"dynamic_fusion": False},
        {"bands": ["LH", "HL", "HH"]},
    ],
)
def test_every_switch_builds_trains_and_scores(options: dict) -> None:
    model = build_model("bsdrd", "resnet18", pretrained=False, options=options)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("detail_decoder" in names) == options.get("detail", True)
    assert ("scale_attention" in names) == options.get("dynamic_fusion", True)
    assert ("gates" in names) == (options.get("detail", True) and options.get("gated_fusion", True))
    x = torch.randn(2, 3, 64, 64)
    parts = model.loss({}, model.train()(x))
    parts["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    with torch.no_grad():
        out = model.eval()(x)
    assert out.anomaly_map.shape == (2, 64, 64)


def test_bad_bands_are_refused() -> None:
    with pytest.raises(KdadError, match="bands"):
        build_model("bsdrd", "resnet18", pretrained=False, options={"bands": ["XX"]})
