"""What predict writes per image: heatmap overlay, binary defect mask, defect instances, and
the run's predictions.csv (one line an image) and predictions.jsonl (with instances)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from kdad.errors import KdadError
from kdad.metrics import EIGHT


def upsample_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (h, w) anomaly map resized bilinearly to the original (height, width)."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return t[0, 0].numpy()


JET = colormaps["jet"](np.arange(256))[:, :3].astype(np.float32)  # (256, 3): its 256 colours
PNG_LEVEL = 1  # zlib level of the PNGs kdad writes: ~4x faster than 6, files ~1.4x larger


def jet(heat: np.ndarray) -> np.ndarray:
    """``heat`` (H, W) in [0, 1] jet-coloured (H, W, 3) in [0, 1]: the colours matplotlib gives
    (a value's bin among its 256), looked up in a table."""
    return JET[np.minimum((np.clip(heat, 0, 1) * 256).astype(np.int32), 255)]


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Jet-coloured ``heat`` (H, W) in [0, 1] blended over the image (H, W, 3) in [0, 1]."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * jet(heat)  # (H, W, 3)
    return Image.fromarray((blend * 255).round().astype(np.uint8))


def heat_png(heat: np.ndarray) -> Image.Image:
    """Jet-coloured ``heat`` (h, w) in [0, 1] alone, as an RGB image."""
    return Image.fromarray((jet(heat) * 255).round().astype(np.uint8))


def region_outlines(heat: np.ndarray, height: int, width: int) -> list[list[list[float]]]:
    """Closed outlines of the regions where ``heat`` (h, w), normalised (0.5 = the pixel
    threshold), is >= 0.5: polygons [[x, y], ...] in the (height, width) image's coordinates
    (0 to width, as SVG draws them; the map stretched over the image as ``upsample_map`` does),
    traced at the map's resolution (contourpy, matplotlib's contour tracer)."""
    import contourpy

    h, w = heat.shape
    padded = np.pad(heat.astype(np.float64), 1, constant_values=0.0)  # every outline closes
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    sx, sy = width / w, height / h
    return [
        [[round(float(x - 0.5) * sx, 1), round(float(y - 0.5) * sy, 1)] for x, y in line]
        for line in lines
    ]


def defect_mask(heat: np.ndarray, defect: bool) -> np.ndarray:
    """The defect mask (H, W) bool: pixels whose normalised ``heat`` is >= 0.5 (the pixel
    threshold), on a part judged defective only (none on a good part)."""
    return (heat >= 0.5) & defect


def find_instances(mask: np.ndarray, heat: np.ndarray) -> list[dict[str, Any]]:
    """8-connected defect regions of ``mask`` (H, W): box [x0, y0, x1, y1) in original pixels,
    area in pixels, max and mean of ``heat`` inside, largest first."""
    labels, n = ndimage.label(mask, structure=EIGHT)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(heat), labels, idx)
    maxima = ndimage.maximum(heat, labels, idx)
    means = ndimage.mean(heat, labels, idx)
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        out.append(
            {
                "box": [int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop)],
                "area": int(areas[k]),
                "max_score": round(float(maxima[k]), 6),
                "mean_score": round(float(means[k]), 6),
            }
        )
    return sorted(out, key=lambda d: -d["area"])


@dataclass
class ImageResult:
    """One image's outcome. Without calibration: raw score only, no decision or mask."""

    path: str
    score: float | None = None
    normalised_score: float | None = None
    decision: str | None = None  # "ok" or "defect"
    instances: list[dict[str, Any]] = field(default_factory=list)
    heatmap: str = ""
    mask: str = ""
    error: str = ""


def unique_names(names: list[PurePosixPath]) -> list[str]:
    """A distinct output name for each input's relative name, in order, without its suffix
    (``good/001.png`` -> ``good/001``); a name taken twice (``a.png`` and ``a.jpg``, or two named
    folders holding the same file) gets ``_1``, ``_2``...: the same list on every rank, so ranks
    never write the same file."""
    used: set[str] = set()
    out = []
    for name in names:
        base = str(name.with_suffix(""))
        stem, k = base, 1
        while stem in used:
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        out.append(stem)
    return out


class PredictionWriter:
    """Streams each image's files and its lines of predictions.csv and predictions.jsonl.

    A writer for one rank's ``shard`` writes the images' files but puts its lines, with each
    image's input index, in a hidden shard file that ``merge_shards`` turns into the two lists.
    ``heatmaps`` and ``masks`` False: those files are not written (their columns stay empty).
    """

    COLUMNS = (
        "path",
        "score",
        "normalised_score",
        "decision",
        "defects",
        "heatmap",
        "mask",
        "error",
    )

    def __init__(
        self, out: Path, shard: int | None = None, heatmaps: bool = True, masks: bool = True
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.kinds = {"heatmaps": heatmaps, "masks": masks}
        for sub, wanted in self.kinds.items():
            if wanted:
                (out / sub).mkdir(exist_ok=True)
        self.out = out
        self._files = []
        if shard is None:
            self._csv_file = open(out / "predictions.csv", "w", newline="")  # noqa: SIM115
            self._jsonl = open(out / "predictions.jsonl", "w")  # noqa: SIM115
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(self.COLUMNS)
            self._files = [self._csv_file, self._jsonl]
        else:
            self._shard = open(shard_path(out, shard), "w")  # noqa: SIM115
            self._files = [self._shard]
        self.sharded = shard is not None

    def write(
        self,
        result: ImageResult,
        stem: str,
        index: int = 0,
        image: np.ndarray | None = None,
        heat: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        """Save the overlay of ``heat`` and the binary ``mask`` (original resolution) as
        ``stem``.png if given (``stem`` may hold subfolders, made as needed), then the result's
        lines (``index``: its place among the inputs)."""
        if image is not None and heat is not None and self.kinds["heatmaps"]:
            result.heatmap = f"heatmaps/{stem}.png"
            _parent(self.out / result.heatmap)
            heatmap_overlay(image, heat).save(self.out / result.heatmap, compress_level=PNG_LEVEL)
        if mask is not None and self.kinds["masks"]:
            result.mask = f"masks/{stem}.png"
            _parent(self.out / result.mask)
            mask_png = Image.fromarray(mask.astype(np.uint8) * 255)
            mask_png.save(self.out / result.mask, compress_level=PNG_LEVEL)
        if self.sharded:
            self._shard.write(json.dumps({"index": index, **asdict(result)}) + "\n")
        else:
            self.write_lines(result)

    def write_lines(self, result: ImageResult) -> None:
        """The result's line in predictions.csv and in predictions.jsonl."""
        self._csv.writerow(
            [
                result.path,
                "" if result.score is None else f"{result.score:.6g}",
                "" if result.normalised_score is None else f"{result.normalised_score:.6g}",
                result.decision or "",
                len(result.instances) if result.decision else "",
                result.heatmap,
                result.mask,
                result.error,
            ]
        )
        self._jsonl.write(json.dumps(asdict(result)) + "\n")

    def close(self) -> None:
        for f in self._files:
            f.close()


def _parent(path: Path) -> None:
    """Make the folder that ``path`` goes in."""
    path.parent.mkdir(parents=True, exist_ok=True)


def shard_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its lines until they are merged."""
    return out / f".predictions.rank{rank}.jsonl"


def merge_shards(out: Path, world: int, count: int) -> Path:
    """Merge the ``world`` ranks' shard files into predictions.csv and .jsonl in input order,
    checking that each of the ``count`` inputs is there exactly once; the shards are removed."""
    results: dict[int, ImageResult] = {}
    for rank in range(world):
        path = shard_path(out, rank)
        if not path.is_file():
            raise KdadError(f"{path}: rank {rank} wrote no predictions")
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            k = entry.pop("index")
            if k in results:
                raise KdadError(f"{path}: input {k} ({entry['path']}) predicted twice")
            results[k] = ImageResult(**entry)
    missing = sorted(set(range(count)) - set(results))
    if missing or len(results) != count:
        raise KdadError(f"{out}: {len(missing)} of {count} inputs have no prediction")
    writer = PredictionWriter(out)
    try:
        for k in range(count):
            writer.write_lines(results[k])
    finally:
        writer.close()
    for rank in range(world):
        shard_path(out, rank).unlink()
    return out / "predictions.csv"
