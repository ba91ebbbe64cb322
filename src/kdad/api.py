"""The Python API behind the CLI: train, load a Detector, predict, evaluate."""

from __future__ import annotations

import json
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
from kdad.data.layouts import SPLITS, KdadWarning, collect_images, detect_layout, find_samples
from kdad.engine.checkpoint import load_checkpoint
from kdad.engine.evaluate import evaluate_model
from kdad.engine.fit import fit, model_from_config, resolve_device
from kdad.errors import KdadError
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
    save_maps: str | Path | None = None,
) -> dict[str, Any]:
    """Score a labelled test set: every metric, the protocol and per-image scores, also written
    to OUT/metrics.json; ``save_maps`` writes the maps and ground truth to an .npz.
    Data defaults to the training data's folder."""
    det = load(checkpoint, device)
    d = det.cfg.data
    root = Path(data) if data else Path(d.path)
    layout = layout or d.layout
    if layout == "auto":
        layout = detect_layout(root)
    category = category if category is not None else d.category
    samples = find_samples(root, "test", layout, category, d.normal_dir, d.abnormal_dir, d.mask_dir)
    ds = ImageDataset(
        samples, d.image_size, det.mean.flatten().tolist(), det.std.flatten().tolist()
    )
    ev = evaluate_model(det.model, ds, batch_size)
    paths = [str(s.path) for s in samples]
    if save_maps is not None:
        ev.save(save_maps, paths)
    result = {
        "metrics": ev.metrics(),
        "counts": {
            "images": len(samples),
            "defective": int(ev.labels.sum()),
            "pixel_metric_images": int(ev.has_mask.sum()),
        },
        "protocol": {
            "checkpoint": str(det.checkpoint["path"]),
            "epoch": det.checkpoint.get("epoch"),
            "model": det.cfg.model.name,
            "backbone": det.cfg.model.backbone,
            "data": str(root),
            "layout": layout,
            "category": category,
            "split": SPLITS[layout],
            "image_size": d.image_size,
            "masks": "binarised at half their value range, resized bilinearly, > 0.5",
            "score": det.model.score_rule,
            "aupro": "8-connected regions, all test images pooled, integrated to FPR 0.3, / 0.3",
            "iap": "8-connected instances found when half their pixels >= t; pixel precision",
        },
        "inference_seconds": ev.seconds,
        "per_image": [
            {"path": p, "label": s.label, "defect": s.defect, "score": float(sc)}
            for p, s, sc in zip(paths, samples, ev.scores)
        ],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out / "metrics.json")
    return result
