"""STU-Seg: the U-Net student, its switches, and what each one changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_mvtec

import kdad
from kdad.data.io import read_image
from kdad.engine.checkpoint import load_checkpoint
from kdad.errors import KdadWarning
from kdad.models import build_model
from kdad.models.distill import Pair
from kdad.models.layers import pixel_cosine_loss


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


def test_seg_head_student_learns_the_good_images_only() -> None:
    torch.manual_seed(0)
    model = build_model("stu_seg", "resnet18", pretrained=False, options={"seg_head": True})
    model.phase = "student"
    x = torch.randn(3, 3, 64, 64)
    t, s = model.train()(x)
    batch = {"label": torch.tensor([0, 1, 0])}  # the middle image carries a synthetic defect
    parts = model.loss(batch, Pair(t, s))
    good = [0, 2]
    expected = [pixel_cosine_loss(a[good], b[good]) for a, b in zip(t, s)]
    assert [parts[f"cos{i}"].item() for i in range(3)] == pytest.approx(
        [e.item() for e in expected], rel=1e-5
    )
    parts = model.loss({"label": torch.ones(3, dtype=torch.long)}, Pair(t, s))
    assert parts["loss"].item() == 0  # no good image in the batch: nothing to learn


def test_seg_head_option_trains_the_student_then_the_head_alone(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "data", n_train=10)
    run = tmp_path / "run"
    settings = dict(
        data=data, model="stu_seg", options={"seg_head": True, "defects": "perlin"}, batch_size=4,
        image_size=32,
        val_every=1, out=run, progress=False,
    )  # fmt: skip
    with pytest.warns(KdadWarning, match="head gets 0 optimiser steps"):
        kdad.train(epochs=1, **settings)  # the student phase only
    student = load_checkpoint(run / "checkpoint.pt")["model"]
    assert not (run / "best.pt").exists()  # the untrained head is never validated nor kept
    with pytest.warns(KdadWarning, match="head gets 2 optimiser steps"):
        ckpt = kdad.train(epochs=2, resume=True, **settings)  # the head phase
    after = load_checkpoint(ckpt)["model"]
    for name, v in student.items():
        same = torch.equal(v, after[name])
        assert same == (not name.startswith("head.")), name  # student, BN statistics frozen
    res = kdad.evaluate(ckpt)
    assert res["protocol"]["score"] == "mean of the top 0.15% of the segmentation map"
    det = kdad.load(ckpt)
    maps, _ = det._run([read_image(p) for p in load_checkpoint(ckpt)["holdout"]])
    assert maps.min() >= 0 and maps.max() <= 1  # the head's probability
    kdad.api.export(ckpt, tmp_path / "onnx")  # checked against PyTorch inside
