"""``kdad export``: one ONNX graph holding everything between the camera and the decision, and
the onnxruntime runner that serves it without PyTorch.

The graph takes a uint8 RGB batch (B, H, W, 3) of any size and contains the resize (bilinear,
antialiased, as training), the teacher's normalisation, the model, its smoothing, and the
calibrated normalisation; it returns the normalised map (B, h, w) (0.5 = pixel threshold), the
normalised score (B,) (0.5 = image threshold), the raw score (B,) and the decision (B,) bool.
Beside it, kdad.json keeps the run's config and calibration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.data.dataset import input_hw
from kdad.detector import Detector
from kdad.engine.calibrate import normalise
from kdad.engine.runtime import cache_dir, graph_key, ort_session, prune, write_onnx
from kdad.errors import KdadError
from kdad.files import atomic_write

OUTPUTS = ("map", "score", "raw_score", "defect")


class Deployable(nn.Module):
    """A model with its pre- and post-processing: uint8 (B, H, W, 3) in, decisions out."""

    def __init__(
        self,
        model: nn.Module,
        image_size: int | list[int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        calibration: dict[str, Any],
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.size = input_hw(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        c = calibration
        self.image = (float(c["image_threshold"]), float(c["image_low"]))
        self.pixel = (float(c["pixel_threshold"]), float(c["pixel_low"]))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(
            x, size=self.size, mode="bilinear", align_corners=False, antialias=True
        ).clamp(0, 1)
        out = self.model((x - self.mean) / self.std)
        amap = normalise(out.anomaly_map, *self.pixel)  # (B, h, w)
        score = normalise(out.score, *self.image)  # (B,)
        return amap, score, out.score, out.score >= self.image[0]


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 18) -> Path:
    """Write ``out``/model.onnx and ``out``/kdad.json from a calibrated checkpoint, then check
    that onnxruntime reproduces PyTorch on a test image (maps to 1e-4, same decision)."""
    return export_detector(Detector.load(checkpoint, "cpu"), out, opset)


def export_detector(det: Detector, out: str | Path, opset: int = 18) -> Path:
    """export_onnx of a detector loaded on the CPU."""
    wrapped = deployable(det)
    size = det.cfg.data.image_size
    h, w = input_hw(size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    example = torch.randint(0, 256, (2, h + 8, w + 16, 3), dtype=torch.uint8)
    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        1: torch.export.Dim("height", min=16, max=16384),
        2: torch.export.Dim("width", min=16, max=16384),
    }

    def write(tmp: Path) -> None:
        write_onnx(wrapped, example, tmp, {"images": dims}, ["images"], list(OUTPUTS), opset)

    atomic_write(path, write)
    meta = {
        "format": "kdad-onnx-1",
        "input": {"name": "images", "dtype": "uint8", "layout": "BHWC", "channels": "RGB"},
        "outputs": list(OUTPUTS),
        "image_size": size,
        "model": det.cfg.model.name,
        "score_rule": det.model.score_rule,
        "config": det.cfg.to_dict(),
        "calibration": det.calibration,
        "checkpoint": str(Path(det.checkpoint["path"]).resolve()),
    }
    atomic_write(out / "kdad.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    check = torch.randint(0, 256, (1, h + 24, w - 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref = wrapped(check)
    got = OnnxRunner(out).run(check.numpy())
    if np.abs(got["map"] - ref[0].numpy()).max() > 1e-4 or bool(got["defect"][0]) != bool(ref[3]):
        raise KdadError(f"{path}: onnxruntime does not reproduce PyTorch; please report this")
    return path


def deployable(det: Detector) -> Deployable:
    """A calibrated detector's model with the pre- and post-processing of the export."""
    if det.calibration is None:
        raise KdadError(
            f"{det.checkpoint.get('path', 'checkpoint')}: no calibration; run `kdad calibrate`"
        )
    return Deployable(
        det.model,
        det.cfg.data.image_size,
        tuple(det.mean.flatten().tolist()),
        tuple(det.std.flatten().tolist()),
        det.calibration,
    ).eval()


class TorchRunner:
    """A checkpoint run by PyTorch with exactly the exported graph's inputs and outputs."""

    runtime = "pytorch"

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        det = Detector.load(checkpoint, device)
        self.graph = deployable(det)
        self.device = det.device
        self.meta = {"model": det.cfg.model.name, "image_size": det.cfg.data.image_size}
        self.calibration = det.calibration

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, H, W, 3) -> map (B, h, w), score, raw_score (B,), defect (B,) bool."""
        out = self.graph(torch.from_numpy(images).to(self.device))
        return {k: v.cpu().numpy() for k, v in zip(OUTPUTS, out)}


class OnnxRunner:
    """An exported model run by onnxruntime: no PyTorch needed at run time."""

    runtime = "onnxruntime"

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        folder = Path(folder)
        if folder.suffix == ".onnx":
            folder = folder.parent
        meta_path, model_path = folder / "kdad.json", folder / "model.onnx"
        if not model_path.is_file() or not meta_path.is_file():
            raise KdadError(f"{folder}: not a kdad export (needs model.onnx and kdad.json)")
        self.meta = json.loads(meta_path.read_text())
        self.calibration = self.meta["calibration"]
        self.session = ort_session(model_path, threads)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, H, W, 3) -> map (B, h, w), score, raw_score (B,), defect (B,) bool."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise KdadError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        return dict(zip(OUTPUTS, self.session.run(None, {"images": images})))


def cached_export(checkpoint: str | Path) -> Path:
    """The checkpoint's export (export_onnx) in the graph cache (engine/runtime.py), written
    when absent: the folder, keyed by its weights, calibration, code and versions."""
    det = Detector.load(checkpoint, "cpu")
    hw = input_hw(det.cfg.data.image_size)
    folder = cache_dir() / "exports" / graph_key(det.model, hw, ("deployable", det.calibration))
    if (folder / "model.onnx").is_file() and (folder / "kdad.json").is_file():
        os.utime(folder)  # used now
        return folder
    export_detector(det, folder)
    prune(folder.parent)
    return folder


def load_runner(
    source: str | Path, device: str = "cpu", threads: int | None = None, runtime: str = "auto"
) -> TorchRunner | OnnxRunner:
    """An export folder (or its model.onnx) runs on onnxruntime; so does a checkpoint or run
    folder, exported once into the graph cache, unless ``runtime`` is pytorch or ``device`` a
    GPU: then PyTorch runs it (with ``threads`` threads in this process)."""
    p = Path(source)
    if not p.exists():
        raise KdadError(f"{p}: no such model (a checkpoint, run folder or export folder)")
    if p.suffix == ".onnx" or (p / "kdad.json").is_file():
        return OnnxRunner(p, threads)
    if runtime == "auto" and device == "cpu":
        return OnnxRunner(cached_export(p), threads)
    if threads:
        torch.set_num_threads(threads)
    return TorchRunner(p, device)
