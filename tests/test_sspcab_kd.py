"""SSPCAB+SimAM KD: the student built from the backbone, its switches and its losses."""

from __future__ import annotations

import pytest
import torch

from kdad.models import build_model
from kdad.models.sspcab_kd import Attentive


@pytest.mark.parametrize(
    "options", [{}, {"sspcab": False}, {"simam": False}, {"sspcab": False, "simam": False}]
)
def test_every_switch_builds_trains_and_scores(options: dict) -> None:
    torch.manual_seed(0)
    model = build_model("sspcab_kd", "efficientnet_lite0", pretrained=False, options=options)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("sspcab" in names) == options.get("sspcab", True)
    kept = {n.split(".")[-2] for n, _ in model.student.named_parameters()}
    assert "_conv_head" not in kept and "_fc" not in kept  # nothing past the last stage
    x = torch.randn(2, 3, 64, 64)
    t, s, pre = model.train()(x)
    assert [a.shape for a in t] == [b.shape for b in s]
    parts = model.loss({}, Attentive(t, s, pre))
    assert ("sspcab" in parts) == options.get("sspcab", True)
    parts["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for g in model.param_groups() for p in g["params"])
    with torch.no_grad():
        out = model.eval()(x)
    assert out.anomaly_map.shape == (2, 64, 64) and out.score.shape == (2,)


def test_without_attention_blocks_the_student_is_the_plain_backbone() -> None:
    """Both switches off: the student's features are the randomly initialised backbone's."""
    torch.manual_seed(0)
    model = build_model(
        "sspcab_kd", "resnet18", pretrained=False, options={"sspcab": False, "simam": False}
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats, _ = model.students(x)
        y = x
        for piece, f in zip(model.student, feats):
            y = piece(y)
            assert torch.equal(y, f)
        on = build_model("sspcab_kd", "resnet18", pretrained=False).eval()
        on.student.load_state_dict(model.student.state_dict())
        assert not torch.allclose(on.students(x)[0][0], feats[0])  # SimAM re-weights
