"""Find samples on disk: MVTec, folder and Magnetic Tile layouts, detected when not named.

A layout turns a folder into ``Sample`` records (image path, label, mask path). Problems in the
folder are reported by file: a defective image without a mask or a mask without an image warns,
an empty folder or an unknown layout is an error.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from kdad.config import DataConfig
from kdad.data.io import is_image_file
from kdad.errors import KdadError, KdadWarning

LAYOUTS = ("auto", "mvtec", "folder", "mtd")
SPLITS = {  # how each layout splits train and test, for results tables
    "mvtec": "train/good to fit; test/* (good and defective) to test",
    "folder": "the good folder to fit; a separate folder's good/ and defect/ to test",
    "mtd": "DifferNet split: 761 MT_Free images to fit; the other 191 and all 392 defective "
    "images to test",
}


@dataclass(frozen=True)
class Sample:
    """One image: its path, 0 = good / 1 = defective, its mask (None = no defect pixels known)."""

    path: Path
    label: int
    mask: Path | None = None
    defect: str = "good"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            if (folder / (name + ext)).is_file():
                return folder / (name + ext)
    return None


def _warn_orphans(mask_dir: Path, used: set[Path]) -> None:
    """Warn about masks no image claimed (``used`` holds the claimed masks and the images)."""
    orphans = [p.name for p in _images(mask_dir) if p not in used]
    if orphans:
        shown = ", ".join(orphans[:3]) + (", ..." if len(orphans) > 3 else "")
        warnings.warn(
            f"{mask_dir}: {len(orphans)} mask(s) match no image, ignored: {shown}",
            KdadWarning,
            stacklevel=3,
        )


def _defective(images: list[Path], mask_dir: Path, defect: str) -> list[Sample]:
    """Samples for defective images, each with its mask; warn for images and masks unmatched."""
    samples, used = [], set(images)  # images may share the mask folder (Magnetic Tile)
    for p in images:
        mask = _find_mask(mask_dir, p.stem)
        if mask is None:
            warnings.warn(
                f"{p}: defective image has no mask in {mask_dir}; left out of pixel metrics",
                KdadWarning,
                stacklevel=3,
            )
        else:
            used.add(mask)
        samples.append(Sample(p, 1, mask, defect))
    _warn_orphans(mask_dir, used)
    return samples


def _mvtec_root(root: Path, category: str | None) -> Path:
    if category:
        if not (root / category).is_dir():
            raise KdadError(f"{root}: no category folder {category!r}")
        return root / category
    if (root / "train").is_dir() or (root / "test").is_dir():
        return root
    cats = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    raise KdadError(f"{root}: several categories, pass --category (one of {', '.join(cats)})")


def _mvtec(root: Path, split: str, category: str | None) -> list[Sample]:
    root = _mvtec_root(root, category)
    if split == "train":
        return [Sample(p, 0) for p in _images(root / "train" / "good")]
    samples: list[Sample] = []
    test = root / "test"
    for d in sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []:
        if d.name == "good":
            samples += [Sample(p, 0) for p in _images(d)]
        else:
            samples += _defective(_images(d), root / "ground_truth" / d.name, d.name)
    return samples


def _folder(root: Path, split: str, normal: str, abnormal: str, masks: str) -> list[Sample]:
    direct = _images(root)
    if direct:  # a plain folder of good images
        return [Sample(p, 0) for p in direct]
    samples = [Sample(p, 0) for p in _images(root / normal)]
    if split == "test":
        samples += _defective(_images(root / abnormal), root / masks, abnormal)
    return samples


def _shipped_split(name: str) -> set[str]:
    """The non-empty lines of the split file ``name`` shipped in kdad/data/splits."""
    text = resources.files("kdad.data").joinpath(f"splits/{name}").read_text()
    return {line.strip() for line in text.splitlines() if line.strip()}


def mtd_train_names() -> set[str]:
    """The 761 DifferNet training images of Magnetic Tile (file names in MT_Free/Imgs)."""
    return _shipped_split("mtd_differnet_train.txt")


def mtd_key(path: Path) -> str:
    """A Magnetic Tile image's name in the shipped split files: ``MT_<class>/<file name>``."""
    return f"{path.parent.parent.name}/{path.name}"


def alternate_halves(samples: list[Sample]) -> list[str]:
    """The rule of the Magnetic Tile dev/final split: per class, every other image in sorted
    file-name order, the first to ``dev``. Returns each sample's half, in order."""
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.defect, []).append(i)
    halves = [""] * len(samples)
    for idx in by_class.values():
        for k, i in enumerate(sorted(idx, key=lambda i: samples[i].path.name)):
            halves[i] = "dev" if k % 2 == 0 else "final"
    return halves


def mtd_dev_names() -> set[str]:
    """The dev half of the Magnetic Tile test set (``MT_<class>/<file name>``, 294 of 583
    images); the other test images are the final half. Settings are chosen on dev, reported on
    final (and on the full test set)."""
    return _shipped_split("mtd_test_dev.txt")


def declared_subsets(layout: str, samples: list[Sample]) -> tuple[dict[str, np.ndarray], str]:
    """The named subsets a layout declares for its test set ``samples`` (each a bool mask
    (N,)), and the one results tables report ("" for the whole set). Magnetic Tile: ``dev``,
    where settings are chosen, and ``final``, where they are reported (kdad's shipped split,
    ``mtd_dev_names``); the other layouts declare none."""
    if layout != "mtd":
        return {}, ""
    dev = mtd_dev_names()
    in_dev = np.array([mtd_key(s.path) in dev for s in samples], bool)
    return {"dev": in_dev, "final": ~in_dev}, "final"


def _mtd(root: Path, split: str) -> list[Sample]:
    train = mtd_train_names()
    free = [p for p in _images(root / "MT_Free" / "Imgs") if p.suffix.lower() == ".jpg"]
    missing = train - {p.name for p in free}
    if missing:
        raise KdadError(
            f"{root / 'MT_Free' / 'Imgs'}: {len(missing)} DifferNet training images missing, "
            f"e.g. {sorted(missing)[0]}"
        )
    if split == "train":
        return [Sample(p, 0) for p in free if p.name in train]
    samples = [Sample(p, 0) for p in free if p.name not in train]
    for d in sorted(root.glob("MT_*")):
        if d.name == "MT_Free" or not (d / "Imgs").is_dir():
            continue
        imgs = [p for p in _images(d / "Imgs") if p.suffix.lower() == ".jpg"]
        samples += _defective(imgs, d / "Imgs", d.name.removeprefix("MT_"))
    return samples


def detect_layout(root: Path) -> str:
    """Name the layout of ``root`` from its folders, or raise naming what was expected."""
    if (root / "MT_Free" / "Imgs").is_dir():
        return "mtd"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "mvtec"
    if any((p / "train").is_dir() for p in root.iterdir() if p.is_dir()):
        return "mvtec"
    if _images(root) or (root / "good").is_dir():
        return "folder"
    raise KdadError(
        f"{root}: cannot tell the layout: expected MT_Free/Imgs (mtd), train/ or test/ (mvtec), "
        "or images or good/ (folder)"
    )


def find_samples(
    root: str | Path,
    split: str,
    layout: str = "auto",
    category: str | None = None,
    normal_dir: str = "good",
    abnormal_dir: str = "defect",
    mask_dir: str = "mask",
) -> list[Sample]:
    """Samples of ``split`` ("train": good images to fit; "test": everything labelled)."""
    root = Path(root)
    if not root.is_dir():
        raise KdadError(f"{root}: data folder not found")
    if split not in ("train", "test"):
        raise KdadError(f"split must be train or test, not {split!r}")
    if layout not in LAYOUTS:
        raise KdadError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "mvtec":
        samples = _mvtec(root, split, category)
    elif layout == "mtd":
        samples = _mtd(root, split)
    else:
        samples = _folder(root, split, normal_dir, abnormal_dir, mask_dir)
    if not samples:
        raise KdadError(f"{root}: no {split} images found ({layout} layout)")
    return samples


def _images_below(folder: Path, exclude: Path | None) -> list[Path]:
    """Image files anywhere below ``folder``, hidden files and folders and ``exclude`` (e.g. the
    output folder) skipped, in sorted order of their path relative to ``folder``."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and (exclude is None or Path(top, d).resolve() != exclude)
        )
        found += [p for name in sorted(files) if is_image_file(p := Path(top, name))]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def collect_images(
    inputs: list[str | Path], exclude: str | Path | None = None
) -> list[tuple[Path, PurePosixPath]]:
    """Image files named directly or found, recursively, in named folders, each with its name
    relative to the folder named (``day1/cam2/001.png``; a file named directly: its own name).
    Folders are walked in sorted order, and ``exclude`` (a folder, e.g. the output) is skipped."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, PurePosixPath]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = _images_below(item, skip)
            if not images:
                raise KdadError(f"{item}: no images found (searched its subfolders too)")
            found += [(p, PurePosixPath(*p.relative_to(item).parts)) for p in images]
        elif item.is_file():
            found.append((item, PurePosixPath(item.name)))
        else:
            raise KdadError(f"{item}: no such file or folder")
    return found


def split_holdout(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(fit, held out): a fixed random ``fraction`` of the samples, at least one when the
    fraction is positive and two or more samples exist, independent of the run's seed."""
    if not 0 <= fraction < 1:
        raise KdadError(f"holdout must be in [0, 1), got {fraction}")
    k = min(max(round(len(samples) * fraction), int(fraction > 0)), len(samples) - 1)
    if k <= 0:
        return samples, []
    held = set(np.random.default_rng(0).permutation(len(samples))[:k].tolist())
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )


def training_samples(d: DataConfig) -> tuple[list[Sample], list[Sample]]:
    """The good training images of ``d``: (those a model fits on, those held out to calibrate)."""
    samples = find_samples(
        d.path, "train", d.layout, d.category, d.normal_dir, d.abnormal_dir, d.mask_dir
    )
    return split_holdout(samples, d.holdout)
