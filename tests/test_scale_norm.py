"""Per-scale weighting of the distillation map: fitted on held-out good images, saved with the
model, refitted by recalibration, and the plain sum for checkpoints from before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_folder

import kdad
from kdad.data.layouts import Sample
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint
from kdad.errors import KdadError
from kdad.models import build_model
from kdad.models.distill import Distiller, scale_maps

DISTILLERS = ["rd", "iig_rd", "bsdrd", "stu_seg", "sspcab_kd"]


def _model(name: str, **options) -> Distiller:
    torch.manual_seed(0)
    return build_model(name, "resnet18", options=options, pretrained=False).eval()


def _maps(model: Distiller, x: torch.Tensor) -> list[torch.Tensor]:
    """Each scale's unweighted, unsmoothed map of ``x`` as the model sees it."""
    model.scale_weights.fill_(1.0)
    model._normal_means = []
    with torch.no_grad():
        model(x)
    per_image = model._normal_means[0]  # (B, S): what fit_normal averages
    model._normal_means = None
    return per_image


@pytest.mark.parametrize("name", DISTILLERS)
def test_fitted_weights_give_each_scale_a_unit_mean_on_the_good_images(name: str) -> None:
    model = _model(name)
    x = torch.randn(5, 3, 64, 64)
    means = _maps(model, x).mean(0)  # (S,)
    assert len(means) == 3 and (means > 0).all()
    model.fit_normal([x[:2], x[2:]])  # batches of unequal size: every image counts once
    torch.testing.assert_close(model.scale_weights, 1 / means, rtol=1e-4, atol=0)
    # the map is the smoothed weighted sum of the scale maps, its max the score
    with torch.no_grad():
        out = model(x)
        t = model.teacher(x)
        maps = scale_maps(t, model.student(t), (64, 64)) if name == "rd" else None
    assert out.anomaly_map.shape == (5, 64, 64)
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))
    if maps is not None:
        weighted = sum(w * m for w, m in zip(model.scale_weights, maps))
        torch.testing.assert_close(out.anomaly_map, model.blur(weighted))
        assert [float((w * m).mean()) for w, m in zip(model.scale_weights, maps)] == pytest.approx(
            [1.0, 1.0, 1.0], rel=1e-3
        )


def test_scale_norm_off_keeps_the_published_plain_sum() -> None:
    model = _model("rd", scale_norm=False)
    x = torch.randn(3, 3, 64, 64)
    model.fit_normal([x])
    assert torch.equal(model.scale_weights, torch.ones(3))
    with torch.no_grad():
        t = model.teacher(x)
        plain = model.blur(sum(scale_maps(t, model.student(t), (64, 64))))
        assert torch.equal(model(x).anomaly_map, plain)


@pytest.mark.parametrize("name", DISTILLERS)
def test_map_stages_leave_a_scale_out_of_the_map(name: str) -> None:
    model = _model(name, map_stages=["layer2", "layer3"])
    x = torch.randn(3, 3, 64, 64)
    model.fit_normal([x])
    assert (model.scale_weights != 1).all()  # every scale is still fitted (and trained)
    full = _model(name)
    full.load_state_dict(model.state_dict())
    full.scale_weights[0] = 0.0  # the same map, with layer1 weighted out instead
    with torch.no_grad():
        torch.testing.assert_close(model(x).anomaly_map, full(x).anomaly_map)
        assert not torch.allclose(model(x).anomaly_map, _model(name)(x).anomaly_map)
    assert model.score_rule.endswith("the map sums layer2, layer3")
    for bad in (["layer4"], []):
        with pytest.raises(KdadError, match="map_stages must be some of the model's stages"):
            _model(name, map_stages=bad)


def test_a_state_dict_from_before_the_weights_loads_as_the_plain_sum() -> None:
    model = _model("rd")
    model.fit_normal([torch.randn(2, 3, 64, 64)])
    old = {k: v for k, v in model.state_dict().items() if k != "scale_weights"}
    fresh = _model("rd")
    fresh.scale_weights.fill_(7.0)
    fresh.load_state_dict(old)  # strict: no missing-key error
    assert torch.equal(fresh.scale_weights, torch.ones(3))


def test_training_fits_the_weights_and_recalibration_refits_them(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "f", n_good=12)
    ckpt = kdad.train(
        model="rd",
        data=data / "good",
        epochs=1,
        batch_size=4,
        image_size=64,
        holdout=0.34,
        out=tmp_path / "r",
        progress=False,
    )
    state = load_checkpoint(ckpt)
    trained = state["model"]["scale_weights"]
    assert trained.shape == (3,) and not torch.equal(trained, torch.ones(3))
    # the held-out good images, as the model sees them, have mean 1 at every scale
    det = kdad.load(ckpt)
    held = det.dataset([Sample(Path(p), 0) for p in state["holdout"]])
    good = torch.stack([held[i]["image"] for i in range(len(held))])  # (4, 3, 64, 64)
    det.model.fit_normal([good])
    torch.testing.assert_close(det.model.scale_weights, trained, rtol=1e-4, atol=0)
    # a checkpoint saved without them (older kdad) gets them back from `kdad calibrate`
    state.pop("path")
    del state["model"]["scale_weights"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    assert torch.equal(kdad.load(old).model.scale_weights, torch.ones(3))
    kdad.calibrate(old)
    torch.testing.assert_close(
        load_checkpoint(old)["model"]["scale_weights"], trained, rtol=1e-4, atol=0
    )
