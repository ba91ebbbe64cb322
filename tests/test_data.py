"""Data: image formats, layouts, detection, and a clear message for every bad input."""

from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from conftest import SIZE, make_folder, make_mtd, make_mvtec, save, texture
from PIL import Image

from kdad.data.dataset import ImageDataset
from kdad.data.io import read_image, read_mask
from kdad.data.layouts import (
    Sample,
    alternate_halves,
    collect_images,
    detect_layout,
    find_samples,
    mtd_dev_names,
    mtd_key,
    split_holdout,
)
from kdad.errors import KdadError, KdadWarning
from kdad.outputs import unique_names
from kdad.synth.datasets import SyntheticValidationSet


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "tif"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_read_8bit_formats(tmp_path: Path, ext: str, mode: str) -> None:
    if ext == "jpg" and mode == "RGBA":
        pytest.skip("JPEG has no alpha")
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    img = Image.fromarray(rgb).convert(mode)
    img.save(tmp_path / f"x.{ext}")
    arr = read_image(tmp_path / f"x.{ext}")
    assert arr.shape == (10, 12, 3) and arr.dtype == np.float32
    expected = np.asarray(img.convert("RGB"), np.float32)[0, 0] / 255
    assert np.allclose(arr[0, 0], expected, atol=0.03)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_read_16bit_gray(tmp_path: Path, ext: str) -> None:
    a = np.full((8, 9), 50000, np.uint16)
    a[0, 0] = 0
    Image.fromarray(a).save(tmp_path / f"x.{ext}")
    arr = read_image(tmp_path / f"x.{ext}")
    assert arr.shape == (8, 9, 3)
    assert arr[0, 0, 0] == 0 and abs(arr[1, 1, 1] - 50000 / 65535) < 1e-4


def test_masks_binarised_at_half_range(tmp_path: Path) -> None:
    m = np.array([[0, 100, 127, 128, 255]], np.uint8)
    save(tmp_path / "m.png", m)
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, False, True, True]]
    save(tmp_path / "m16.png", np.array([[0, 40000]], np.uint16))
    assert read_mask(tmp_path / "m16.png").tolist() == [[False, True]]


def test_unreadable_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(KdadError, match=r"text\.png: cannot read image"):
        read_image(tmp_path / "text.png")
    save(tmp_path / "full.jpg", texture(np.random.default_rng(0), 128))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdadError, match=r"cut\.jpg: cannot read image"):
        read_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize("suffix", ["_mask", ""])
def test_mvtec_layout_both_mask_namings(tmp_path: Path, suffix: str) -> None:
    root = make_mvtec(tmp_path / "d", mask_suffix=suffix)
    assert detect_layout(root) == "mvtec"
    train = find_samples(root, "train")
    test = find_samples(root, "test")
    assert len(train) == 8 and all(s.label == 0 for s in train)
    assert sum(s.label for s in test) == 4 and len(test) == 8
    assert all(s.mask is not None and s.mask.stem.startswith(s.path.stem) for s in test if s.label)


def test_mvtec_root_with_categories(tmp_path: Path) -> None:
    make_mvtec(tmp_path / "root" / "bottle")
    make_mvtec(tmp_path / "root" / "screw")
    assert detect_layout(tmp_path / "root") == "mvtec"
    with pytest.raises(KdadError, match=r"--category.*bottle, screw"):
        find_samples(tmp_path / "root", "train")
    assert len(find_samples(tmp_path / "root", "train", category="screw")) == 8


def test_orphan_masks_and_maskless_defects_warn(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "d")
    save(root / "ground_truth" / "scratch" / "999_mask.png", np.zeros((4, 4), np.uint8))
    (root / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.warns(KdadWarning) as record:
        test = find_samples(root, "test")
    messages = [str(w.message) for w in record]
    assert any("000.png: defective image has no mask" in m for m in messages)
    assert any("1 mask(s) match no image" in m and "999_mask.png" in m for m in messages)
    assert sum(s.label for s in test) == 4  # the maskless one still counts for image metrics


def test_folder_layout(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f")
    assert detect_layout(root) == "folder"
    assert len(find_samples(root, "train")) == 6
    test = find_samples(root, "test")
    assert len(test) == 9 and all(s.mask is not None for s in test if s.label)
    plain = tmp_path / "plain"
    for i in range(3):
        save(plain / f"{i}.bmp", texture(np.random.default_rng(i)))
    assert detect_layout(plain) == "folder" and len(find_samples(plain, "train")) == 3


def test_mtd_layout_uses_shipped_differnet_split(tmp_path: Path) -> None:
    root = make_mtd(tmp_path / "mtd")
    assert detect_layout(root) == "mtd"
    assert len(find_samples(root, "train")) == 761
    test = find_samples(root, "test")
    assert [s.label for s in test].count(0) == 3 and [s.label for s in test].count(1) == 2
    assert all(s.mask.suffix == ".png" for s in test if s.label)


def test_empty_and_unknown_folders_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(KdadError, match="empty: no train images found"):
        find_samples(tmp_path / "empty", "train")
    (tmp_path / "odd" / "stuff").mkdir(parents=True)
    with pytest.raises(KdadError, match="odd: cannot tell the layout"):
        find_samples(tmp_path / "odd", "train")
    with pytest.raises(KdadError, match="missing: data folder not found"):
        find_samples(tmp_path / "missing", "train")
    with pytest.raises(KdadError, match="no images found"):
        collect_images([tmp_path / "empty"])


def test_collected_names_are_relative_sorted_and_unique(tmp_path: Path) -> None:
    img = texture(np.random.default_rng(0))
    for rel in ["b/001.png", "a/x/001.png", "a/001.jpg", "a/001.png", "a/.hid/001.png", "0.png"]:
        save(tmp_path / "in" / rel, img)
    (tmp_path / "in" / "a" / "readme.txt").write_text("skip me")
    save(tmp_path / "in" / "out" / "heat.png", img)  # the output folder: skipped
    save(tmp_path / "solo.png", img)
    found = collect_images([tmp_path / "in", tmp_path / "solo.png"], exclude=tmp_path / "in/out")
    names = [str(n) for _, n in found]
    assert names == ["0.png", "a/001.jpg", "a/001.png", "a/x/001.png", "b/001.png", "solo.png"]
    assert all(p.is_file() for p, _ in found)
    unique = unique_names([n for _, n in found])
    assert unique == ["0", "a/001", "a/001_1", "a/x/001", "b/001", "solo"]
    assert unique_names([PurePosixPath("a.png")] * 3) == ["a", "a_1", "a_2"]


def test_dataset_resizes_and_normalises(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "d")
    ds = ImageDataset(find_samples(root, "test"), 32, (0.5,) * 3, (0.25,) * 3)
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert item["label"] == 1 and item["has_mask"] and item["mask"].sum() == 64  # 16x16 -> 8x8
    assert item["image"].min() >= -2 - 1e-6 and item["image"].max() <= 2 + 1e-6
    assert torch.equal(ds[0]["mask"], torch.zeros(32, 32)) and ds[0]["label"] == 0


def test_mask_of_wrong_size_is_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "d", n_bad=1)
    save(root / "ground_truth" / "scratch" / "000_mask.png", np.zeros((SIZE, 10), np.uint8))
    ds = ImageDataset(find_samples(root, "test"), 32, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(KdadError, match=r"000_mask\.png: mask is"):
        ds[len(ds) - 1]


@pytest.mark.slow
def test_real_magnetic_tile_split(shared_data: Path) -> None:
    root = shared_data / "magnetic-tile"
    assert len(find_samples(root, "train")) == 761
    test = find_samples(root, "test")
    assert len(test) == 583 and sum(s.label for s in test) == 392


@pytest.mark.slow
def test_real_battery_weld_orphans_warn_not_stop(shared_data: Path) -> None:
    root = shared_data / "battery-weld" / "welding"
    with pytest.warns(KdadWarning, match="40 mask\\(s\\) match no image"):
        test = find_samples(root, "test")
    assert len(find_samples(root, "train")) == 37 and sum(s.label for s in test) == 93


def test_holdout_split_is_fixed_and_disjoint(tmp_path: Path) -> None:
    samples = find_samples(make_mvtec(tmp_path / "d", n_train=20), "train")
    fit, held = split_holdout(samples, 0.1)
    assert len(held) == 2 and len(fit) == 18 and not set(fit) & set(held)
    assert split_holdout(samples, 0.1) == (fit, held)
    assert split_holdout(samples, 0.0) == (samples, [])
    assert len(split_holdout(samples[:3], 0.1)[1]) == 1  # at least one when asked for
    with pytest.raises(KdadError, match="holdout"):
        split_holdout(samples, 1.0)


def test_synthetic_validation_set(tmp_path: Path) -> None:
    samples = find_samples(make_mvtec(tmp_path / "d", n_train=3), "train")
    val = SyntheticValidationSet(samples, 32, (0.5,) * 3, (0.25,) * 3, seed=1)
    plain = ImageDataset(samples, 32, (0.5,) * 3, (0.25,) * 3)
    assert len(val) == 6
    good, bad = val[0], val[3]
    assert good["label"] == 0 and good["mask"].sum() == 0
    assert torch.equal(good["image"], plain[0]["image"])
    assert bad["label"] == 1 and bad["mask"].sum() > 0 and bad["has_mask"]
    assert not torch.equal(bad["image"], good["image"])
    assert torch.equal(val[3]["image"], bad["image"])  # the same defect every time


def test_alternate_halves_split_each_class_by_name() -> None:
    names = [("Crack", "c3"), ("good", "g1"), ("Crack", "c1"), ("good", "g0"), ("Crack", "c2")]
    samples = [Sample(Path(f"MT_{d}/Imgs/{n}.jpg"), int(d != "good"), None, d) for d, n in names]
    assert alternate_halves(samples) == ["dev", "final", "dev", "dev", "final"]


def test_shipped_mtd_dev_half_follows_the_rule(shared_data: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KdadWarning)
        samples = find_samples(shared_data / "magnetic-tile", "test", "mtd")
    halves = alternate_halves(samples)
    dev = {mtd_key(s.path) for s, h in zip(samples, halves) if h == "dev"}
    assert dev == mtd_dev_names() and len(dev) == 294 and len(samples) == 583
