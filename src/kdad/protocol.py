"""The test protocol, what `kdad test` and `kdad bench` record: a checkpoint scored on a
labelled test set, every metric over the whole set and over each subset its layout declares
(Magnetic Tile: dev and final), with per-class image AUROC, the protocol in words and each
image's score."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdad.config import ScoreConfig
from kdad.data.layouts import SPLITS, declared_subsets, detect_layout, find_samples
from kdad.detector import Detector
from kdad.engine.distributed import describe_machine
from kdad.engine.evaluate import evaluate_model
from kdad.errors import KdadWarning
from kdad.files import atomic_write


def evaluate(
    checkpoint: str | Path,
    data: str | Path | None = None,
    layout: str | None = None,
    category: str | None = None,
    out: str | Path | None = None,
    batch_size: int = ScoreConfig.batch_size,
    device: str = ScoreConfig.device,
    save_maps: str | Path | None = None,
    runtime: str = ScoreConfig.runtime,
) -> dict[str, Any]:
    """Score a labelled test set: every metric and per-class image AUROC, the same for each
    subset its layout declares, the protocol and per-image scores; also written to
    OUT/metrics.json. ``save_maps`` writes the maps and ground truth to an .npz. Data defaults to
    the training data's folder; ``runtime`` scores (config.RUNTIMES)."""
    with warnings.catch_warnings():  # metrics need no calibration
        warnings.simplefilter("ignore", KdadWarning)
        det = Detector.load(checkpoint, device, runtime)
    d = det.cfg.data
    root = Path(data) if data else Path(d.path)
    layout = layout or d.layout
    if layout == "auto":
        layout = detect_layout(root)
    category = category if category is not None else d.category
    samples = find_samples(root, "test", layout, category, d.normal_dir, d.abnormal_dir, d.mask_dir)
    ev = evaluate_model(det.scorer, det.dataset(samples), batch_size)
    paths = [str(s.path) for s in samples]
    if save_maps is not None:
        ev.save(save_maps, paths)
    classes = np.array([s.defect for s in samples])
    whole = ev.summary(np.ones(len(samples), bool), classes)
    subsets, reported = declared_subsets(layout, samples)
    result = {
        "metrics": whole["metrics"],
        "image_auroc_per_class": whole["image_auroc_per_class"],
        "subsets": {name: ev.summary(sel, classes) for name, sel in subsets.items()},
        "reported": reported,
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
        "machine": describe_machine(det.device),
        "runtime": det.scorer.runtime,
        "inference_seconds": ev.seconds,
        "per_image": [
            {
                "path": p,
                "label": s.label,
                "defect": s.defect,
                "mask": None if s.mask is None else str(s.mask),
                "score": float(sc),
            }
            for p, s, sc in zip(paths, samples, ev.scores)
        ],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return result
