"""The Python API behind the CLI: train, load a Detector, predict, evaluate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from kdad.config import RunConfig, apply_overrides, load_config
from kdad.data.layouts import SPLITS, KdadWarning, detect_layout, find_samples
from kdad.detector import Detector, Prediction
from kdad.engine.evaluate import evaluate_model
from kdad.engine.fit import fit
from kdad.errors import KdadError


def train(
    cfg: RunConfig | None = None,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train a model; returns the checkpoint to use (RUN_DIR/best.pt, see engine.fit).

    ``cfg`` (or the YAML file ``config``) gives the base settings, keyword ``overrides`` such as
    ``data=..., epochs=..., out=...`` replace single fields (names as the CLI flags).
    """
    if cfg is None:
        cfg = load_config(config) if config else RunConfig()
    cfg = apply_overrides(cfg, **overrides)
    if not resume and not cfg.data.path:
        raise KdadError("no training data: give data=PATH (--data)")
    return fit(cfg, resume=resume, progress=progress)


def _train_one(kwargs: dict[str, Any]) -> Path:
    return train(**kwargs)


def train_categories(
    categories: list[str],
    jobs: int = 1,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Path]:
    """Train one model per category of a dataset root, into OUT/<category>, ``jobs`` at a time
    in separate processes. With ``resume`` each category continues its run (a finished one is
    left as it is; one never started starts); without, an existing run is an error for that
    category only. Returns each category's checkpoint; failures are raised together at the end."""
    from kdad.engine.pool import run_parallel

    base = load_config(config) if config else RunConfig()
    base = apply_overrides(base, **overrides)
    if not base.data.path:
        raise KdadError("no training data: give data=PATH (--data)")
    runs = []
    for cat in categories:
        out = Path(base.out) / cat
        cfg = apply_overrides(RunConfig.from_dict(base.to_dict()), category=cat, out=out)
        again = resume and (out / "checkpoint.pt").is_file()
        runs.append({"cfg": cfg, "resume": again, "progress": progress and jobs == 1})
    done, failed = run_parallel(
        _train_one, runs, jobs, lambda r: f"{r['cfg'].data.category} ({r['cfg'].out})"
    )
    if failed:
        first = min(failed)
        raise KdadError(
            f"{len(failed)} of {len(categories)} categories failed; "
            f"first: {categories[first]}: {failed[first]}"
        )
    return {categories[i]: path for i, path in sorted(done.items())}


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
    with warnings.catch_warnings():  # metrics need no calibration
        warnings.simplefilter("ignore", KdadWarning)
        det = load(checkpoint, device)
    d = det.cfg.data
    root = Path(data) if data else Path(d.path)
    layout = layout or d.layout
    if layout == "auto":
        layout = detect_layout(root)
    category = category if category is not None else d.category
    samples = find_samples(root, "test", layout, category, d.normal_dir, d.abnormal_dir, d.mask_dir)
    ev = evaluate_model(det.model, det.dataset(samples), batch_size)
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


__all__ = ["Detector", "Prediction", "evaluate", "load", "train", "train_categories"]
