"""Input sizes and training views: (height, width) inputs, squash advice, flips and turns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec, save
from PIL import Image

from kdad.data.dataset import TrainSet, choose_size, input_hw, preprocess, squash_advice
from kdad.data.layouts import Sample, find_samples
from kdad.engine.checkpoint import load_checkpoint
from kdad.errors import KdadError
from kdad.synth.datasets import SyntheticTrainSet, SyntheticValidationSet

NORM = ((0.0,) * 3, (1.0,) * 3)  # identity normalisation: items are the images in [0, 1]


def test_input_size_is_a_side_or_height_width() -> None:
    assert input_hw(256) == (256, 256)
    assert input_hw([320, 128]) == (320, 128)
    for bad in ([256], [1, 2, 3], [256, 16], 8, [256.0, 128]):
        with pytest.raises(KdadError, match="image_size must be"):
            input_hw(bad)


def test_height_width_input_keeps_a_thin_line_a_square_loses(tmp_path: Path) -> None:
    """A 1-pixel line across a tall part keeps its full contrast at the part's aspect, and fades
    to about a quarter squashed 4x into a square."""
    img = np.full((256, 64, 3), 0.8, np.float32)
    img[129] = 0.0  # the crack, along the width
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    tall = preprocess(img, (256, 64), mean, std)  # (3, 256, 64): aspect kept
    square = preprocess(img, 64, mean, std)  # (3, 64, 64): height squashed 4x
    assert tall.shape == (3, 256, 64) and square.shape == (3, 64, 64)
    dip_tall = 0.8 - tall[0].mean(1).min()
    dip_square = 0.8 - square[0].mean(1).min()
    assert dip_tall > 0.75 and dip_square < 0.3


def test_squash_advice_names_the_size_that_keeps_the_aspect(tmp_path: Path) -> None:
    tall = [
        Sample(save(tmp_path / f"t{i}.png", np.zeros((1250, 500), np.uint8)), 0, None, "good")
        for i in range(3)
    ]
    message = squash_advice(tall, (256, 256))
    assert "1250x500" in message and "height 2.5x" in message
    assert "--image-size 416 160" in message  # 2.5:1 at about 256x256's pixel count
    assert squash_advice(tall, (416, 160)) is None
    near = [Sample(save(tmp_path / "n.png", np.zeros((300, 240), np.uint8)), 0, None, "good")]
    assert squash_advice(near, (256, 256)) is None  # 1.25x: left alone


def shaped(tmp_path: Path, shapes: list[tuple[int, int]]) -> list[Sample]:
    """Good samples of the given (height, width): only their headers are read."""
    return [
        Sample(save(tmp_path / f"s{i}.png", np.zeros(hw, np.uint8)), 0, None, "good")
        for i, hw in enumerate(shapes)
    ]


def test_squash_advice_rounds_to_what_the_model_needs(tmp_path: Path) -> None:
    tall = shaped(tmp_path, [(1250, 500)] * 3)
    message = squash_advice(tall, (256, 256), multiple=64)  # a model with a stride-32 stage
    assert "--image-size 384 192" in message
    assert squash_advice(tall, (384, 192), multiple=64) is None  # 2.0x: within 1.5x of 2.5x


def test_auto_size_keeps_a_shared_far_aspect_and_says_so(tmp_path: Path) -> None:
    """Line-scan parts of one aspect, 2.5:1 (with a few pixels' jitter): kept, at about
    256x256's pixel count, in multiples of what the model's deepest stage needs."""
    tall = shaped(tmp_path, [(1250, 500), (1248, 500), (1250, 496), (1252, 502)])
    size, line = choose_size(tall, 32)
    assert size == [416, 160]  # the size the squash warning names for this part
    assert "input 416x160 (height x width), chosen" in line and "squash 2.5x" in line
    assert choose_size(tall, 64)[0] == [384, 192]
    for hw in choose_size(tall, 32)[0], choose_size(tall, 64)[0]:
        assert 0.8 < hw[0] * hw[1] / 256**2 < 1.2


def test_auto_size_stays_square_for_mixed_or_near_square_sets(tmp_path: Path) -> None:
    # Magnetic Tile's kind of set: every aspect from tall to wide; the median of each side
    # is far from square, but no aspect is shared
    mixed = shaped(tmp_path / "m", [(285, 122), (360, 360), (273, 218), (331, 520), (600, 200)])
    assert choose_size(mixed, 32)[0] == 256
    # all wider than tall, but from 1.4:1 to 2.1:1 (battery-weld's spread): not one aspect
    welds = shaped(tmp_path / "w", [(285, 400), (256, 400), (256, 400), (214, 400), (188, 400)])
    assert choose_size(welds, 64)[0] == 256
    near = shaped(tmp_path / "n", [(300, 240)] * 3)  # 1.25:1, shared: a square squashes little
    size, line = choose_size(near, 32)
    assert size == 256 and line == "kdad: input 256x256 (training images typically 300x240)"


def test_auto_size_says_the_resolution_of_large_images(tmp_path: Path) -> None:
    """A 4000x3000 part seen at 256x256: the start line says how coarse that is, and how to
    go finer."""
    size, line = choose_size(shaped(tmp_path, [(3000, 4000)] * 2), 32)
    assert size == 256
    assert "typically 3000x4000: one input pixel covers 12x16 image pixels" in line
    assert "--image-size H W for finer detail" in line


def test_training_images_decoded_once_give_the_same_items(tmp_path: Path) -> None:
    """The cache of decoded training images changes no item, in any view, in any epoch; it
    holds only what its budget allows, and what it holds is never altered by use."""
    samples = find_samples(make_mvtec(tmp_path / "m"), "train")
    plain = TrainSet(samples, 32, *NORM, seed=1, augment=["hflip", "rot90"])
    one = 3 * 32 * 32 * 4  # bytes of one resized image
    cached = TrainSet(samples, 32, *NORM, seed=1, augment=["hflip", "rot90"], cache_bytes=3 * one)
    for epoch in range(3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(samples)):
            assert torch.equal(plain[i]["image"], cached[i]["image"])
    assert sorted(cached.cached) == [0, 1, 2]  # the first three, then the budget was spent
    for i, x in cached.cached.items():
        assert torch.equal(x, plain.load(samples[i].path))


def asymmetric(tmp_path: Path) -> list[Sample]:
    """One image whose every flip and turn differs: a bright 8x4 block in the top-left corner."""
    img = np.zeros((32, 32), np.uint8)
    img[:8, :4] = 255
    return [Sample(save(tmp_path / "a.png", img), 0, None, "good")]


def test_training_views_are_flips_and_turns_fixed_by_seed_and_epoch(tmp_path: Path) -> None:
    samples = asymmetric(tmp_path)
    plain = TrainSet(samples, 32, *NORM)[0]["image"]
    ds = TrainSet(samples, 32, *NORM, seed=3, augment=["hflip", "vflip", "rot90"])
    seen = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        x = ds[0]["image"]
        assert torch.equal(x, ds[0]["image"])  # the same view for the same (seed, epoch, index)
        assert torch.allclose(x.sum(), plain.sum())  # a permutation of the pixels
        seen.append(x[0].numpy().tobytes())
    assert len(set(seen)) == 8  # all eight flips and turns of the block come up
    again = TrainSet(samples, 32, *NORM, seed=3, augment=["hflip", "vflip", "rot90"])
    again.set_epoch(7)
    ds.set_epoch(7)
    assert torch.equal(again[0]["image"], ds[0]["image"])
    assert torch.equal(TrainSet(samples, 32, *NORM, seed=3)[0]["image"], plain)  # none asked


def test_synthetic_defect_and_its_mask_get_the_same_view(tmp_path: Path) -> None:
    samples = find_samples(make_mvtec(tmp_path / "d", n_train=4), "train")
    plain = SyntheticTrainSet(samples, 32, *NORM, seed=1, defect_prob=1.0)
    turned = SyntheticTrainSet(samples, 32, *NORM, seed=1, augment=["rot90"], defect_prob=1.0)
    moved = 0
    for i in range(4):
        a, b = plain[i], turned[i]
        k, _ = next(
            (k, 0)
            for k in range(4)
            if torch.equal(a["mask"].rot90(k, (-2, -1)), b["mask"])
            and torch.equal(a["image"].rot90(k, (-2, -1)), b["image"])
        )
        assert torch.equal(a["clean"].rot90(k, (-2, -1)), b["clean"])
        moved += k != 0
    assert moved  # at least one was turned


def test_bad_views_are_clear_errors(tmp_path: Path) -> None:
    samples = asymmetric(tmp_path)
    with pytest.raises(KdadError, match="unknown augmentation 'shear'"):
        TrainSet(samples, 32, *NORM, augment=["shear"])
    with pytest.raises(KdadError, match="rot90 needs a square"):
        TrainSet(samples, [64, 32], *NORM, augment=["rot90"])
    assert TrainSet(samples, [64, 32], *NORM, augment=["hflip"])[0]["image"].shape == (3, 64, 32)


def test_synthetic_defects_on_a_non_square_input(tmp_path: Path) -> None:
    samples = find_samples(make_mvtec(tmp_path / "d", n_train=3), "train")
    val = SyntheticValidationSet(samples, [96, 32], *NORM, seed=0)
    for i in range(3, 6):
        item = val[i]
        assert item["image"].shape == (3, 96, 32) and item["mask"].shape == (96, 32)
        assert item["mask"].any()


def tall_part(rng: np.random.Generator, crack_row: int | None = None) -> np.ndarray:
    """A 256x64 striped part, uint8 gray; a 1-pixel dark crack across it."""
    y, x = np.mgrid[:256, :64]
    phase = rng.uniform(0, 2 * np.pi)
    img = 0.5 + 0.2 * np.sin(2 * np.pi * (x + 2 * y) / 16 + phase) + rng.normal(0, 0.02, y.shape)
    if crack_row is not None:
        img[crack_row] = 0.05
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_tall_part_with_a_thin_crack_trains_and_predicts_at_its_aspect(tmp_path: Path) -> None:
    """End to end on 256x64 parts at image_size [256, 64]: the crack, 1 pixel thin, is found
    where it is, and the heatmap comes back at the image's own size."""
    import kdad

    rng = np.random.default_rng(0)
    root = tmp_path / "tall"
    for i in range(12):
        save(root / "train" / "good" / f"{i:03d}.png", tall_part(rng))
    rows = []
    for i in range(4):
        save(root / "test" / "good" / f"{i:03d}.png", tall_part(rng))
        row = int(rng.integers(40, 216))
        rows.append(row)
        save(root / "test" / "crack" / f"{i:03d}.png", tall_part(rng, row))
        mask = np.zeros((256, 64), np.uint8)
        mask[row] = 255
        save(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    ckpt = kdad.train(
        model="rd",
        data=root,
        image_size=[256, 64],
        epochs=10,
        batch_size=4,
        out=tmp_path / "run",
        progress=False,
    )
    res = kdad.evaluate(ckpt, out=tmp_path / "run")
    assert res["metrics"]["image_auroc"] >= 0.9
    det = kdad.load(ckpt, device="cpu")
    for i, row in enumerate(rows):
        pred = det.predict([root / "test" / "crack" / f"{i:03d}.png"])[0]
        assert pred.anomaly_map.shape == (256, 64)
        peak = int(pred.anomaly_map.mean(1).argmax())
        assert abs(peak - row) <= 12, (peak, row)
    # The ONNX export keeps the [256, 64] input (export_onnx checks onnxruntime against PyTorch).
    from kdad.export import OnnxRunner, export_onnx

    export_onnx(ckpt, tmp_path / "export")
    img = np.asarray(Image.open(root / "test" / "crack" / "000.png").convert("RGB"))
    got = OnnxRunner(tmp_path / "export").run(img[None])
    assert got["map"].shape == (1, 256, 64)
    assert abs(int(got["map"][0].mean(1).argmax()) - rows[0]) <= 12


def test_an_input_size_the_stages_cannot_use_is_a_clear_error(tmp_path: Path) -> None:
    import kdad

    root = make_mvtec(tmp_path / "d", n_train=4)
    with pytest.raises(KdadError, match=r"image_size 96x96 does not suit .* multiples of 64"):
        kdad.train(
            model="rd",
            data=root,
            stages=["stage3", "stage5", "stage6"],
            image_size=96,
            epochs=1,
            out=tmp_path / "run",
            progress=False,
        )


def test_shipped_recipe_loads_by_name_and_unknown_names_say_what_exists(tmp_path: Path) -> None:
    from kdad.config import load_config, recipe_names

    assert recipe_names() == ["magnetic_tile_stu"]
    stu = load_config("magnetic_tile_stu")
    assert stu.model.name == "stu_seg" and stu.model.options == {"skips": False}
    assert (stu.train.epochs, stu.train.val_every, stu.train.patience) == (40, 40, 0)
    with pytest.raises(KdadError, match=r"no shipped recipe of that name \(recipes: .*magnetic"):
        load_config("granite")
    (tmp_path / "own.yaml").write_text("train:\n  epochs: 3\n")
    assert load_config(tmp_path / "own.yaml").train.epochs == 3


def fine_part(rng: np.random.Generator, band: int | None = None) -> np.ndarray:
    """A 1024x64 grey part: 1-pixel stripes across it (rows alternately lighter and darker by
    0.25) over a slow wave; from row ``band``, 8 rows where the stripes stop at the same mean
    grey (a thin wear mark). uint8."""
    y, x = np.mgrid[:1024, :64]
    wave = 0.05 * np.sin(2 * np.pi * x / 32 + rng.uniform(0, 2 * np.pi))
    stripes = np.where(y % 2 == 0, 0.25, -0.25)
    if band is not None:
        stripes[band : band + 8] = 0.0
    img = 0.5 + wave + stripes + rng.normal(0, 0.01, y.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_default_finds_a_thin_mark_on_a_long_part_that_a_square_input_erases(
    tmp_path: Path,
) -> None:
    """With no size and no model given, 1024x64 parts train at 1024x64 (their aspect, at
    256x256's pixel count) and the default finds an 8-row wear mark where it is. Squashed 4x
    into a 256x256 square, the stripes average to the mark's own grey: the mark is erased from
    the input itself, so no model trained there could find it."""
    import kdad

    rng = np.random.default_rng(0)
    root = tmp_path / "long"
    for i in range(12):
        save(root / "train" / "good" / f"{i:03d}.png", fine_part(rng))
    bands = [int(b) for b in rng.integers(64, 900, 4)]
    for i, band in enumerate(bands):
        save(root / "test" / "good" / f"{i:03d}.png", fine_part(rng))
        save(root / "test" / "wear" / f"{i:03d}.png", fine_part(rng, band))
        mask = np.zeros((1024, 64), np.uint8)
        mask[band : band + 8] = 255
        save(root / "ground_truth" / "wear" / f"{i:03d}_mask.png", mask)
    ckpt = kdad.train(
        data=root, epochs=12, batch_size=4, precision="fp32", out=tmp_path / "run", progress=False
    )
    assert load_checkpoint(ckpt)["config"]["data"]["image_size"] == [1024, 64]
    res = kdad.evaluate(ckpt)
    assert res["metrics"]["image_auroc"] == 1.0
    det = kdad.load(ckpt, device="cpu")
    for i, band in enumerate(bands):
        amap = det.predict([root / "test" / "wear" / f"{i:03d}.png"])[0].anomaly_map
        assert abs(int(amap.mean(1).argmax()) - (band + 4)) <= 16, (band, amap.mean(1).argmax())
    # The input, kept and squashed: the mark's rows against the same part without it.
    pair = [fine_part(np.random.default_rng(7), band) for band in (None, 500)]
    pair = [im.astype(np.float32)[..., None].repeat(3, 2) / 255 for im in pair]
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    kept = [preprocess(im, (1024, 64), mean, std)[0] for im in pair]  # each (1024, 64)
    squashed = [preprocess(im, 256, mean, std)[0] for im in pair]  # each (256, 256)
    assert float((kept[0] - kept[1]).abs().max()) > 0.24  # the stripes gone: the mark
    assert float((squashed[0] - squashed[1]).abs().max()) < 0.04  # at most a sixth of it left
