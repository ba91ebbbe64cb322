"""Read images and masks from disk: 8/16-bit, gray/RGB/RGBA, PNG/JPG/BMP/TIFF, with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdad.errors import KdadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    """True for files whose extension kdad reads, hidden files excluded."""
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _open(path: Path) -> np.ndarray:
    """Decode the whole file into an array; any decoding failure names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = pixels(img)
    except FileNotFoundError as e:
        raise KdadError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise KdadError(f"{path}: cannot read image ({e})") from e
    if arr.size == 0:
        raise KdadError(f"{path}: image is empty")
    return arr


def pixels(img: Image.Image) -> np.ndarray:
    """A decoded image's pixels in its own type: palettes expanded, exotic modes to RGB or L."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if img.mode == "1" else "RGB")
    return np.asarray(img)


def _to_unit(arr: np.ndarray, path: Path) -> np.ndarray:
    """Scale integer or float pixels to float32 in [0, 1] by their type's range."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.uint32, np.dtype(">u2"), np.dtype("<u2")):
        return np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)  # 16-bit data in I;16 or I
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)
    raise KdadError(f"{path}: unsupported pixel type {arr.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as float32 (H, W, 3) in [0, 1]; gray is repeated, alpha dropped."""
    path = Path(path)
    return to_rgb(_open(path), path)


def to_rgb(arr: np.ndarray, name: str | Path) -> np.ndarray:
    """Pixels of any type and channel count kdad reads (``pixels``) -> float32 (H, W, 3) in
    [0, 1] by their type's range: 16-bit data over 65535, whatever its largest value, so an
    image scores the same however it reaches kdad. Errors name ``name``."""
    return _rgb(_to_unit(arr, Path(name)), name)


def to_rgb8(arr: np.ndarray, name: str | Path) -> np.ndarray:
    """``to_rgb``'s levels in 8 bits, uint8 (H, W, 3): 8-bit pixels as they are (no float
    round trip on the serving path), any other type through ``to_rgb``."""
    if arr.dtype == np.uint8:
        return _rgb(arr, name)
    return (to_rgb(arr, name) * 255).round().astype(np.uint8)


def _rgb(arr: np.ndarray, name: str | Path) -> np.ndarray:
    """(H, W), (H, W, 1-4) -> (H, W, 3): gray repeated, alpha dropped; any other shape an
    error naming ``name``."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (2, 4):  # LA or RGBA: drop alpha
        arr = arr[:, :, :-1]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise KdadError(f"{name}: unsupported image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def read_mask(path: str | Path) -> np.ndarray:
    """A binary mask (H, W) bool: pixels above half their type's range are defective."""
    path = Path(path)
    arr = _to_unit(_open(path), path)
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2) if arr.shape[2] != 2 else arr[:, :, 0]
    return arr > 0.5


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError as e:
        raise KdadError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise KdadError(f"{path}: cannot read image ({e})") from e
