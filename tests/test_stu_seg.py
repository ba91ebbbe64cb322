"""STU-Seg: the U-Net student, its switches, and what each one changes."""

from __future__ import annotations

import pytest
import torch

from kdad.models import build_model
from kdad.models.distill import Pair


@pytest.mark.parametrize(
    "options", [{}, {"sfm": False}, {"skips": False}, {"skips": False, "sfm": False}]
)
def test_every_switch_builds_trains_and_scores(options: dict) -> None:
    torch.manual_seed(0)
    model = build_model("stu_seg", "efficientnet_lite0", pretrained=False, options=options)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    skips, sfm = options.get("skips", True), options.get("sfm", True)
    assert ("sfm" in names) == (skips and sfm)
    x = torch.randn(2, 3, 72, 56)  # not a multiple of 16: levels round up like the teacher's
    t, s = model.train()(x)
    assert [a.shape for a in t] == [b.shape for b in s]
    parts = model.loss({}, Pair(t, s))
    parts["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for g in model.param_groups() for p in g["params"])
    with torch.no_grad():
        out = model.eval()(x)
    assert out.anomaly_map.shape == (2, 72, 56) and out.score.shape == (2,)


def test_skips_carry_shallow_detail_to_the_shallow_scale() -> None:
    """With skips, the stride-4 output sees a pixel change through the encoder's stride-4
    level even where the deep path is cut; without them it only comes through the deep path."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., 30:34, 30:34] += 5.0
    for skips in (True, False):
        model = build_model(
            "stu_seg", "resnet18", pretrained=False, options={"skips": skips}
        ).eval()
        with torch.no_grad():
            for p in model.up[-1].parameters():
                p.zero_()  # cut the deep path into the shallowest level
            a, b = model.student(x)[0], model.student(y)[0]
        assert (not torch.allclose(a, b)) == skips
