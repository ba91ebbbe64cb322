"""DeST-DDPM: its two training phases, its score rule and its options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_mvtec

from kdad.engine.schedule import learning_rate, phase_at, phase_warnings
from kdad.errors import KdadError, KdadWarning
from kdad.models import build_model
from kdad.models.seghead import head_loss, self_distance


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    clean = torch.randn(4, 3, 64, 64)
    mask = torch.zeros(4, 64, 64)
    mask[:2, 10:30, 20:40] = 1
    image = torch.where(mask[:, None] > 0, clean + 2, clean)
    return {"image": image, "clean": clean, "mask": mask}


def test_phase_one_trains_the_student_phase_two_the_head_alone() -> None:
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options={"student": "destseg"})
    batch = _batch()
    student = [
        *model.encoder.parameters(),
        *model.bottleneck.parameters(),
        *model.decoder.parameters(),
    ]

    assert phase_at(model.phases(10), 0).name == "student"
    model.phase = "student"
    model.train()
    parts = model.loss(batch, model(batch["image"]))
    assert set(parts) == {"loss", "cos0", "cos1", "cos2", "cos3"}  # the deep stages, 4-32
    parts["loss"].backward()
    assert all(p.grad is not None for p in student)
    assert all(p.grad is None for p in model.head.parameters())
    model.zero_grad(set_to_none=True)

    for epoch, epochs, seg in [(0, 1, False), (0, 2, False), (1, 2, True), (2, 4, True)]:
        assert (phase_at(model.phases(epochs), epoch).name == "head") == seg
    model.phase = phase_at(model.phases(10), 7).name
    model.train()
    assert model.head.training and not model.encoder.training and not model.decoder.training
    stats = model.decoder[0][0].bn1.running_mean.clone()
    parts = model.loss(batch, model(batch["image"]))
    assert set(parts) == {"loss", "focal", "l1"}
    parts["loss"].backward()
    assert all(p.grad is None for p in student)
    assert all(p.grad is not None for p in model.head.parameters())
    assert torch.equal(model.decoder[0][0].bn1.running_mean, stats)  # frozen statistics


def test_map_is_a_probability_and_score_the_mean_of_its_top_pixels() -> None:
    options = {"top_share": 0.01, "image_score": "head", "map": "head"}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    with torch.no_grad():
        out = model.eval()(_batch()["image"])
    amap = out.anomaly_map
    assert amap.shape == (4, 64, 64) and amap.min() >= 0 and amap.max() <= 1
    k = round(0.01 * 64 * 64)
    expected = amap.flatten(1).sort(1, descending=True).values[:, :k].mean(1)
    assert torch.allclose(out.score, expected)


def test_score_adds_the_students_disagreement_both_standardised_on_good_images() -> None:
    torch.manual_seed(0)
    both = {"image_score": "both", "map": "head"}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=both).eval()
    alone = {"image_score": "head", "map": "head"}
    head = build_model("dest_ddpm", "resnet18", pretrained=False, options=alone)
    head.load_state_dict(model.state_dict())
    head.eval()
    good = [torch.rand(4, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        model.fit_normal(iter(good))
        scores = torch.cat([model(x).score for x in good])
        heads = torch.cat([head(x).score for x in good])
        t = [model.mapped(model.teacher(x)) for x in good]
        s = [model.mapped(model.student(x)) for x in good]
    maps = [[1 - torch.cosine_similarity(a, b, dim=1) for a, b in zip(*p)] for p in zip(t, s)]
    means = torch.stack([torch.cat([m[i].flatten() for m in maps]).mean() for i in range(3)])
    assert torch.allclose(model.scale_weights, 1 / means)  # each scale by its normal level
    student = torch.cat([model.student_score(m, (64, 64)) for m in maps])
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    assert torch.allclose(scores, z(heads) + z(student), atol=1e-4)
    assert abs(scores.mean()) < 1e-4  # good images score about 0
    fitted = ("normal", "pixel_normal", "scale_weights")
    old = {k: v for k, v in model.state_dict().items() if k not in fitted}
    model.load_state_dict(old)  # a checkpoint from before scores by its head alone
    with torch.no_grad():
        assert torch.allclose(torch.cat([model(x).score for x in good]), heads)
    with pytest.raises(KdadError, match="image_score must be"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"image_score": "max"})


def test_bad_defect_options_are_refused() -> None:
    with pytest.raises(KdadError, match="'perlin' or 'ddpm'"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"defects": "dtd"})
    with pytest.raises(KdadError, match="ddpm_steps and ddpm_count must be at least 1"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"ddpm_count": 0})
    with pytest.raises(KdadError, match="head_lr_schedule must be constant or cosine, got 'step'"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"head_lr_schedule": "step"})


def test_head_lr_schedule_decays_the_heads_learning_rate_and_not_the_students() -> None:
    """By default every phase follows the run's schedule; ``head_lr_schedule: cosine`` decays
    the head's phase (every head's) over its epochs and leaves the student's as the run's."""
    default = build_model("dest_ddpm", "resnet18", pretrained=False)
    assert [p.lr_schedule for p in default.phases(10)] == [None, None]
    options = {"head_lr_schedule": "cosine"}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    student, head = model.phases(10)
    assert student.lr_schedule is None and head.lr_schedule == "cosine"
    lrs = [learning_rate(0.1, "constant", model.phases(10), e, 10) for e in range(10)]
    start = head.start
    assert lrs[:start] == [0.1] * start and lrs[start] == 0.1 and lrs[-1] < 0.1 / 4
    options = {"head_lr_schedule": "cosine", "wide_head": [0.1, 0.6]}
    two = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    assert [p.lr_schedule for p in two.phases(20)] == [None, "cosine", "cosine"]


def test_too_few_head_steps_warn() -> None:
    options = {"student_share": 0.2}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    # the student's fifth of 12 epochs is 2 (rounded): 10 head epochs of 10 steps, 100 steps
    assert phase_warnings("dest_ddpm", model.phases(12), 12, 10) == []
    (warning,) = phase_warnings("dest_ddpm", model.phases(11), 11, 10)
    assert "gets 90 optimiser steps" in warning
    rd = build_model("rd", "resnet18", pretrained=False)
    assert phase_warnings("rd", rd.phases(1), 1, 1) == []


@pytest.mark.slow
def test_only_segmentation_phase_epochs_are_validated_and_kept(tmp_path: Path) -> None:
    """best.pt and its calibration never come from the student phase, whose head is untrained."""
    import kdad
    from kdad.engine.checkpoint import load_checkpoint

    data = make_mvtec(tmp_path / "data", n_train=10)
    run = tmp_path / "run"
    with pytest.warns(KdadWarning, match="head gets 6 optimiser steps"):  # 3 epochs of 2
        kdad.train(
            data=data, model="dest_ddpm", options={"defects": "perlin", "student_share": 0.2},
            epochs=4, batch_size=4,
            image_size=32, val_every=1,
            out=run, progress=False,
        )  # fmt: skip
    history = load_checkpoint(run / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in history if "val" in h] == [2, 3, 4]
    assert load_checkpoint(run / "best.pt")["best"]["epoch"] in (2, 3, 4)


def test_head_loss_binarises_the_resized_masks_as_destseg() -> None:
    """The masks, resized to the logits, are binarised at 0.5 before both losses: a head sure
    of "good" has no L1 loss on a mask of 0.4 everywhere, and the whole of it on one of 0.6."""

    logits = torch.full((1, 1, 2, 2), -30.0)  # sure that every cell is good
    assert head_loss(logits, torch.full((1, 8, 8), 0.4))["l1"].item() == pytest.approx(0, abs=1e-9)
    assert head_loss(logits, torch.full((1, 8, 8), 0.6))["l1"].item() == pytest.approx(1, abs=1e-6)


def test_student_decoder_climbs_by_bilinear_upsampling_as_destseg() -> None:
    """No transposed convolution; the student's features match the teacher's shapes, also for
    a non-square input whose sides halve unevenly."""
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options={"student": "destseg"})
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    x = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        t, s = model.teacher(x), model.student(x)
    assert [f.shape for f in s] == [f.shape for f in t]


def test_unet_student_denoises_into_the_teachers_features_and_is_frozen_for_the_head() -> None:
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options={"student": "unet"})
    assert not hasattr(model, "encoder") and model.sfm is None  # STU-Seg's U-Net, no skips
    x = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        t, s = model.teacher(x), model.student(x)
    assert [f.shape for f in s] == [f.shape for f in t]
    batch = _batch()
    model.phase = "student"
    model.train()
    model.loss(batch, model(batch["image"]))["loss"].backward()
    assert all(p.grad is not None for part in model.unet_parts() for p in part.parameters())
    model.zero_grad(set_to_none=True)
    model.phase = "head"
    model.train()
    assert not any(part.training for part in model.unet_parts()) and model.head.training
    model.loss(batch, model(batch["image"]))["loss"].backward()
    assert all(p.grad is None for part in model.unet_parts() for p in part.parameters())
    with pytest.raises(KdadError, match="student must be"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"student": "vit"})


def test_map_stages_feed_the_head_and_the_students_map_while_the_student_learns_all() -> None:
    default = build_model("dest_ddpm", "resnet18", pretrained=False)
    assert default.teacher.strides == [4, 8, 16, 32] and default.map_scales == [1, 2, 3]
    options = {"map_stages": ["layer2", "layer3"]}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    batch = _batch()
    assert model.head[0][0].conv1.in_channels == 128 + 256  # layer2 and layer3 only
    model.phase = "student"
    model.train()
    parts = set(model.loss(batch, model(batch["image"])))
    assert parts == {"loss", "cos0", "cos1", "cos2", "cos3"}
    model.phase = "head"
    logits = model(batch["image"]).logits
    assert logits.shape == (4, 1, 8, 8)  # layer2's scale, stride 8
    model.eval()
    with torch.no_grad():
        model.fit_normal(iter([batch["clean"]]))
        out = model(batch["image"])
    assert model.scale_weights.shape == (2,) and out.anomaly_map.shape == (4, 64, 64)
    with pytest.raises(KdadError, match="map_stages must be some of the model's stages"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"map_stages": ["stage9"]})


def test_map_adds_the_students_map_both_standardised_over_good_pixels() -> None:
    torch.manual_seed(0)
    options = {"map": "both", "image_score": "head"}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    alone = {"map": "head", "image_score": "head"}
    head = build_model("dest_ddpm", "resnet18", pretrained=False, options=alone)
    head.load_state_dict(model.state_dict())
    model.eval()
    head.eval()
    good = [torch.rand(4, 3, 64, 64) for _ in range(3)]
    with torch.no_grad():
        model.fit_normal(iter(good))
        outs = [model(x) for x in good]
        heads = [head(x) for x in good]
        t, s = model.mapped(model.teacher(good[0])), model.mapped(model.student(good[0]))
    maps = [1 - torch.cosine_similarity(a, b, dim=1) for a, b in zip(t, s)]
    student = model.student_map(maps, (64, 64))  # (4, 64, 64)
    hm, hs, sm, ss = model.pixel_normal
    expected = (heads[0].anomaly_map - hm) / hs + (student - sm) / ss
    assert torch.allclose(outs[0].anomaly_map, expected, atol=1e-4)
    assert torch.allclose(torch.cat([o.score for o in outs]), torch.cat([h.score for h in heads]))
    pixels = torch.cat([o.anomaly_map.flatten() for o in outs])
    assert abs(pixels.mean()) < 1e-3  # good pixels sit about 0 on the summed scale
    with pytest.raises(KdadError, match="map must be 'head' or 'both'"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"map": "max"})


def test_a_wide_head_trains_in_a_phase_of_its_own_and_its_map_joins_the_first_heads() -> None:
    torch.manual_seed(0)
    options = {"wide_head": [0.1, 0.6]}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    one = build_model("dest_ddpm", "resnet18", pretrained=False)  # the same, one head
    # the student keeps its 2400 steps and each head gets the one head's 1886
    assert one.schedule_steps(2400) == 4286 and model.schedule_steps(2400) == 6171
    assert one.phases(100)[1].start == 56
    phases = model.phases(144)
    assert [(p.name, p.start, p.scoring) for p in phases] == [
        ("student", 0, False),
        ("head", 56, False),
        ("wide", 100, True),  # only the second head's epochs are validated and kept
    ]
    assert [p.name for p in model.phases(3)] == ["student", "head", "wide"]
    batch = _batch()
    for phase, trained, frozen in [("head", "head", "wide_head"), ("wide", "wide_head", "head")]:
        model.phase = phase
        model.train()
        assert getattr(model, trained).training and not getattr(model, frozen).training
        parts = model.loss(batch, model(batch["image"]))
        assert set(parts) == {"loss", "focal", "l1"}
        parts["loss"].backward()
        assert all(p.grad is not None for p in getattr(model, trained).parameters())
        assert all(p.grad is None for p in getattr(model, frozen).parameters())
        assert all(p.grad is None for part in model.student_parts() for p in part.parameters())
        model.zero_grad(set_to_none=True)

    one.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("wide")})
    model.eval()
    one.eval()
    good = [torch.rand(4, 3, 64, 64) for _ in range(3)]

    def head_maps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, H, W) each
        t, s = model.mapped(model.teacher(x)), model.mapped(model.student(x))
        return tuple(
            torch.sigmoid(F.interpolate(h.segment(t, s), size=(64, 64), mode="bilinear"))[:, 0]
            for h in (model.head, model.wide_head)
        )

    with torch.no_grad():
        model.fit_normal(iter(good))
        one.fit_normal(iter(good))
        got, ref = model(good[0]), one(good[0])
        first, wide = head_maps(good[0])
        wides = torch.cat([head_maps(x)[1].flatten() for x in good])
        pixels = torch.cat([model(x).anomaly_map.flatten() for x in good])
    assert torch.allclose(model.wide_normal, torch.stack([wides.mean(), wides.std()]))
    assert torch.equal(model.pixel_normal, one.pixel_normal)
    assert torch.allclose(got.score, ref.score)  # the image score stays the first head's
    hm, hs, _, _ = model.pixel_normal
    wm, ws = model.wide_normal
    # one head's map is h + s (standardised); two heads' is (h + w) / 2 + s
    expected = ref.anomaly_map - (first - hm) / hs / 2 + (wide - wm) / ws / 2
    assert torch.allclose(got.anomaly_map, expected, atol=1e-4)
    assert not torch.allclose(got.anomaly_map, ref.anomaly_map, atol=1e-2)
    assert abs(pixels.mean()) < 1e-3  # good pixels sit about 0
    with pytest.raises(KdadError, match=r"wide_head must be \[lo, hi\]"):
        build_model("dest_ddpm", "resnet18", pretrained=False, options={"wide_head": [0.6, 0.1]})
    with pytest.raises(KdadError, match="model stu_seg has no option 'wide_head'"):
        build_model("stu_seg", "resnet18", pretrained=False, options={"wide_head": [0.1, 0.6]})


def test_self_distance_marks_what_differs_from_the_rest_of_its_own_image() -> None:
    feats = torch.zeros(2, 4, 6, 6)
    feats[:, 0] = 1.0  # one feature everywhere
    feats[0, :, :2, :3] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None]  # a sixth of another
    feats[1] *= torch.linspace(1, 3, 36).reshape(6, 6)  # brighter, the same direction
    d = self_distance(feats)  # (2, 1, 6, 6)
    assert d.shape == (2, 1, 6, 6)
    assert torch.allclose(d[0, 0, :2, :3], torch.ones(2, 3))  # orthogonal to the median
    assert d[0, 0, 2:].abs().max() < 1e-6 and d[1].abs().max() < 1e-6
    flat = torch.randn(3, 5, 7, 9)  # the median is torch.median's, by sorting
    expected = torch.cosine_similarity(flat, flat.flatten(2).median(2).values[..., None, None])
    assert torch.allclose(self_distance(flat)[:, 0], 1 - expected, atol=1e-6)


def test_head_self_reference_feeds_the_shallowest_scales_distances_to_both_heads() -> None:
    torch.manual_seed(0)
    options = {"head_self_reference": 2, "wide_head": [0.1, 0.6]}
    model = build_model("dest_ddpm", "resnet18", pretrained=False, options=options)
    products = 128 + 256 + 512  # the teacher's strides 8-32
    for head in (model.head, model.wide_head):
        assert head[0][0].conv1.in_channels == products + 2
    batch = _batch()
    model.phase = "head"
    model.train()
    loss = model.loss(batch, model(batch["image"]))["loss"]
    loss.backward()
    first = model.head[0][0].conv1.weight.grad  # (64, products + 2, 3, 3)
    assert first[:, products:].abs().sum() > 0  # the distances reach the loss
    model.eval()
    with torch.no_grad():
        assert model(batch["image"]).anomaly_map.shape == (4, 64, 64)
    for bad in (4, -1, True, 1.5):
        with pytest.raises(KdadError, match="head_self_reference must be a count of scales"):
            build_model(
                "dest_ddpm", "resnet18", pretrained=False, options={"head_self_reference": bad}
            )
