"""The Python API behind the CLI: train, load a Detector, predict, evaluate."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdad.backbones import get_spec
from kdad.config import RunConfig, apply_overrides, load_config
from kdad.data.dataset import ImageDataset, preprocess
from kdad.data.io import read_image
from kdad.data.layouts import KdadWarning, collect_images, find_samples
from kdad.engine.checkpoint import load_checkpoint
from kdad.engine.fit import fit, model_from_config, resolve_device
from kdad.engine.infer import infer
from kdad.errors import KdadError
from kdad.metrics import compute_metrics
from kdad.models import KDModel
from kdad.outputs import PredictionWriter


def train(
    cfg: RunConfig | None = None,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train a model; returns RUN_DIR/checkpoint.pt.

    ``cfg`` (or the YAML file ``config``) gives the base settings, keyword ``overrides`` such as
    ``data=..., epochs=..., out=...`` replace single fields (names as the CLI flags).
    """
    if cfg is None:
        cfg = load_config(config) if config else RunConfig()
    cfg = apply_overrides(cfg, **overrides)
    if not resume and not cfg.data.path:
        raise KdadError("no training data: give data=PATH (--data)")
    return fit(cfg, resume=resume, progress=progress)


@dataclass
class Prediction:
    """One image's result: its anomaly map at model resolution (S, S) and its score."""

    path: str
    score: float
    anomaly_map: np.ndarray


class Detector:
    """A trained model ready to score images."""

    def __init__(self, model: KDModel, cfg: RunConfig, checkpoint: dict[str, Any]) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.checkpoint = checkpoint
        spec = get_spec(cfg.model.backbone)
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto") -> Detector:
        """Rebuild the model from a checkpoint's config and state dict (no download needed)."""
        ckpt = load_checkpoint(checkpoint)
        cfg = RunConfig.from_dict(ckpt["config"], ckpt["path"])
        model = model_from_config(cfg, pretrained=False)
        model.load_state_dict(ckpt["model"])
        return cls(model.to(resolve_device(device)), cfg, ckpt)

    @torch.inference_mode()
    def _run(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        size = self.cfg.data.image_size
        x = torch.stack([preprocess(im, size, self.mean, self.std) for im in images])
        out = self.model(x.to(self.device))
        return out.anomaly_map.float().cpu().numpy(), out.score.float().cpu().numpy()

    def predict(
        self, images: Sequence[str | Path | np.ndarray], batch_size: int = 16
    ) -> list[Prediction]:
        """Score images given as files or float (H, W, 3) arrays in [0, 1]."""
        results = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            arrays = [im if isinstance(im, np.ndarray) else read_image(im) for im in chunk]
            maps, scores = self._run(arrays)
            names = [str(im) if not isinstance(im, np.ndarray) else "" for im in chunk]
            results += [Prediction(n, float(s), m) for n, s, m in zip(names, scores, maps)]
        return results

    def predict_files(
        self, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 16
    ) -> Path:
        """Score image files and folders; write OUT/predictions.csv and OUT/heatmaps/*.png.

        An unreadable image gets a row with its error and a warning; the run goes on.
        """
        out = Path(out)
        paths = collect_images(list(inputs))
        writer = PredictionWriter(out)
        try:
            for i in range(0, len(paths), batch_size):
                chunk = [(p, _try_read(p)) for p in paths[i : i + batch_size]]
                ok = [img for _, img in chunk if not isinstance(img, str)]
                maps, scores = self._run(ok) if ok else ([], [])
                k = 0
                for p, img in chunk:  # rows in input order
                    if isinstance(img, str):
                        writer.write_error(p, img)
                    else:
                        writer.write(p, float(scores[k]), img, maps[k])
                        k += 1
        finally:
            writer.close()
        return out / "predictions.csv"


def _try_read(path: Path) -> np.ndarray | str:
    """The image, or its error message (also warned) when it cannot be read."""
    try:
        return read_image(path)
    except KdadError as e:
        warnings.warn(str(e), KdadWarning, stacklevel=3)
        return str(e)


def load(checkpoint: str | Path, device: str = "auto") -> Detector:
    """Load a trained checkpoint (file or run folder) as a Detector."""
    return Detector.load(checkpoint, device)


def evaluate(
    checkpoint: str | Path,
    data: str | Path | None = None,
    layout: str | None = None,
    category: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> dict[str, Any]:
    """Score a labelled test set; returns (and writes OUT/metrics.json with) the metrics,
    the protocol and per-image scores. Data defaults to the training data's folder."""
    det = load(checkpoint, device)
    d = det.cfg.data
    root = Path(data) if data else Path(d.path)
    layout = layout or d.layout
    category = category if category is not None else d.category
    samples = find_samples(root, "test", layout, category, d.normal_dir, d.abnormal_dir, d.mask_dir)
    ds = ImageDataset(
        samples, d.image_size, det.mean.flatten().tolist(), det.std.flatten().tolist()
    )
    n = len(samples)
    scores, labels = np.zeros(n, np.float32), np.array([s.label for s in samples])
    keep = [i for i, s in enumerate(samples) if s.label == 0 or s.mask is not None]
    row = {i: k for k, i in enumerate(keep)}
    maps = np.zeros((len(keep), d.image_size, d.image_size), np.float32)
    masks = np.zeros(maps.shape, bool)
    tic = time.perf_counter()
    for batch, amaps, bscores in infer(det.model, ds, batch_size):
        for j, i in enumerate(batch["index"].tolist()):
            scores[i] = bscores[j]
            if i in row:
                maps[row[i]] = amaps[j].numpy()
                masks[row[i]] = batch["mask"][j].numpy() > 0.5
    seconds = time.perf_counter() - tic
    result = {
        "metrics": compute_metrics(scores, labels, maps, masks),
        "counts": {"images": n, "defective": int(labels.sum()), "pixel_metric_images": len(keep)},
        "protocol": {
            "checkpoint": str(det.checkpoint["path"]),
            "data": str(root),
            "layout": layout,
            "category": category,
            "image_size": d.image_size,
            "masks": "binarised at half their range, resized bilinearly, > 0.5",
            "score": "max of the anomaly map (the model's rule)",
            "model": det.cfg.model.name,
            "backbone": det.cfg.model.backbone,
        },
        "inference_seconds": seconds,
        "per_image": [
            {"path": str(s.path), "label": s.label, "defect": s.defect, "score": float(sc)}
            for s, sc in zip(samples, scores)
        ],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out / "metrics.json")
    return result
