"""Reverse distillation: the loss, the map and the smoothing are the official definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from kdad.backbones import BACKBONES
from kdad.errors import KdadError
from kdad.models import MODELS, build_model
from kdad.models.distill import Pair, rd_loss, scale_maps
from kdad.models.layers import GaussianBlur


def test_gaussian_blur_equals_scipy() -> None:
    m = torch.rand(2, 40, 37)
    ours = GaussianBlur(4.0)(m).numpy()
    ref = [gaussian_filter(x, sigma=4, mode="reflect", truncate=4.0) for x in m.numpy()]
    assert abs(ours - np.stack(ref)).max() < 1e-5


def test_rd_loss_is_flattened_cosine_per_scale() -> None:
    t = [torch.randn(3, 4, 5, 5), torch.randn(3, 6, 2, 2)]
    s = [torch.randn(3, 4, 5, 5), torch.randn(3, 6, 2, 2)]
    for got, a, b in zip(rd_loss(t, s), t, s):
        per_sample = [
            1 - F.cosine_similarity(a[i].reshape(-1), b[i].reshape(-1), 0) for i in range(3)
        ]
        assert torch.allclose(got, torch.stack(per_sample).mean(), atol=1e-6)
    assert torch.allclose(sum(rd_loss(t, t)), torch.tensor(0.0), atol=1e-6)


def test_student_relu_option_gives_a_signed_student() -> None:
    """Lite's stages are linear (signed); the official student ends each stage in ReLU and so
    cannot match their negative half. ``student_relu: false`` drops that last ReLU."""
    x = torch.randn(2, 3, 64, 64)
    model = build_model("rd", "efficientnet_lite0", pretrained=False).train()
    assert all(bool((f >= 0).all()) for f in model(x)[1])  # the official default
    signed = build_model(
        "rd", "efficientnet_lite0", options={"student_relu": False}, pretrained=False
    ).train()
    assert all(bool((f < 0).any()) for f in signed(x)[1])


def test_pixel_loss_option_averages_per_position_cosines() -> None:
    """loss=pixel: each position's 1 - cos over channels, averaged; flat (official) differs."""
    model = build_model("rd", "resnet18", options={"loss": "pixel"}, pretrained=False)
    t = [torch.randn(2, 4, 3, 3)]
    s = [t[0].clone()]
    s[0][:, :, 0, 0] *= -1  # one position of nine points the other way: 1 - cos = 2 there
    got = model.loss({}, Pair(t, s))["loss"]
    assert torch.allclose(got, torch.tensor(2 / 9), atol=1e-6)
    flat = build_model("rd", "resnet18", pretrained=False).loss({}, Pair(t, s))["loss"]
    assert not torch.allclose(flat, got, atol=1e-3)
    with pytest.raises(KdadError, match="loss must be flat or pixel"):
        build_model("rd", "resnet18", options={"loss": "l2"}, pretrained=False)


def test_scale_maps_are_zero_where_student_matches_and_positive_where_not() -> None:
    t = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    s = [x.clone() for x in t]
    s[0][:, :, :2, :2] = -t[0][:, :, :2, :2]  # opposite direction: 1 - cos = 2
    m = sum(scale_maps(t, s, (32, 32)))
    assert m.shape == (1, 32, 32)
    assert m[0, 0, 0] == pytest.approx(2.0, abs=1e-5) and m[0, -1, -1].abs() < 1e-5


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_rd_builds_on_every_backbone(backbone: str) -> None:
    model = build_model("rd", backbone, pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    t, s = model.train()(x)
    assert [a.shape for a in t] == [b.shape for b in s]
    loss = model.loss({}, Pair(t, s))["loss"]
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.net.training  # the teacher's BatchNorm stays in eval mode
    with torch.no_grad():
        out = model.eval()(x)
    assert out.anomaly_map.shape == (2, 64, 64) and out.score.shape == (2,)
    assert torch.allclose(out.score, out.anomaly_map.flatten(1).amax(1))


def test_trainable_parameters_exclude_the_teacher() -> None:
    model = build_model("rd", "resnet18", pretrained=False)
    trainable = {id(p) for g in model.param_groups() for p in g["params"]}
    teacher = {id(p) for p in model.teacher.parameters()}
    student = {id(p) for n, p in model.named_parameters() if not n.startswith("teacher.")}
    assert trainable == student and not trainable & teacher


def test_bad_stages_and_options_are_clear_errors() -> None:
    with pytest.raises(KdadError, match="no stage 'layer9'"):
        build_model("rd", "resnet18", stages=["layer1", "layer9"], pretrained=False)
    with pytest.raises(KdadError, match="strides double"):
        build_model(
            "rd", "efficientnet_lite0", stages=["stage2", "stage4", "stage5"], pretrained=False
        )
    with pytest.raises(KdadError, match="no option 'sigmaa'"):
        build_model("rd", "resnet18", options={"sigmaa": 2}, pretrained=False)
    with pytest.raises(KdadError, match="unknown model"):
        build_model("nope", "resnet18", pretrained=False)
    assert "rd" in MODELS
