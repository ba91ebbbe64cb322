"""``kdad report``: one self-contained HTML file (figures embedded) explaining a run.

From a test's metrics.json (or the folder holding it): the metrics and the protocol, ROC and PR
curves, score histograms of good and defective parts with the threshold, and the worst false
positives and false negatives with their heatmaps, the true region and the found one outlined.
From a predict folder (predictions.jsonl, no labels): the score distribution and the
highest-scoring images. Images are embedded at their display size, as JPEG.
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from kdad.errors import KdadError, KdadWarning
from kdad.files import atomic_write
from kdad.page import THUMB, html_page, img_tag, jpeg_uri, outline, png_uri


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _histogram(groups: dict[str, np.ndarray], threshold: float | None, title: str) -> str:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins=40)
    for name, v in groups.items():
        ax.hist(v, bins=bins, alpha=0.6, label=f"{name} ({len(v)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return img_tag(png_uri(fig), title)


def _curves(scores: np.ndarray, labels: np.ndarray) -> str:
    fpr, tpr, _ = roc_curve(labels, scores)
    p, r, _ = precision_recall_curve(labels, scores)
    fig = Figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    a.plot(fpr, tpr)
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (images)")
    b.plot(r, p)
    b.set(xlabel="recall", ylabel="precision", title="precision-recall (images)")
    return img_tag(png_uri(fig), "ROC and PR curves")


TRUTH = (255, 0, 255)  # the true region's outline: magenta, a colour jet never takes
FOUND = (255, 255, 255)  # the found region's: white
LEGEND = (
    "<p>Each part at display size with its heatmap; outlined in magenta the true defect (its "
    "mask), in white the region kdad found (pixels past the pixel threshold on a part judged "
    "defective).</p>"
)


def _display(rgb: np.ndarray) -> tuple[int, int]:
    """The (width, height) an image (H, W, ...) is shown at: ``THUMB`` wide at most."""
    h, w = rgb.shape[:2]
    tw = min(THUMB, w)
    return tw, max(1, round(h * tw / w))


def _shrunk_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask (H, W) resized to ``size`` (width, height): the pixels half covered."""
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(small) >= 128


def _overlays(checkpoint: str, rows: list[dict[str, Any]], what: str) -> str:
    """Heatmap overlays of the given images at display size, computed with the run's own
    checkpoint, the true region and the found one outlined."""
    if not rows:
        return f"<p>No {what}.</p>"
    from kdad.data.io import read_image, read_mask
    from kdad.detector import Detector
    from kdad.outputs import heatmap_overlay

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KdadWarning)
        det = Detector.load(checkpoint, device="cpu")
    figs = []
    for r, pred in zip(rows, det.predict([r["path"] for r in rows])):
        img = read_image(r["path"])  # (H, W, 3) in [0, 1]
        _, heat, found = det.analyse(Path(r["path"]), img, pred.anomaly_map, pred.score)
        size = _display(img)
        part = Image.fromarray((img * 255).round().astype(np.uint8)).resize(size)
        small_heat = Image.fromarray(heat.astype(np.float32), mode="F").resize(size)
        rgb = np.asarray(heatmap_overlay(np.asarray(part) / 255.0, np.asarray(small_heat)))
        if found is not None and found.any():
            rgb = outline(rgb, _shrunk_mask(found, size), FOUND)
        if r.get("mask"):
            rgb = outline(rgb, _shrunk_mask(read_mask(r["mask"]), size), TRUTH)
        caption = f"{Path(r['path']).name} ({r.get('defect', '')}) score {r['score']:.4g}"
        figs.append(img_tag(jpeg_uri(Image.fromarray(rgb)), caption, caption, "thumb"))
    return "".join(figs)


def _threshold(checkpoint: str) -> float | None:
    from kdad.engine.checkpoint import load_checkpoint

    cal = load_checkpoint(checkpoint).get("calibration")
    return None if cal is None else cal["image_threshold"]


def labelled_report(metrics_file: Path, top: int = 6) -> str:
    res = json.loads(metrics_file.read_text())
    per = res["per_image"]
    scores = np.array([r["score"] for r in per])
    labels = np.array([r["label"] for r in per])
    ckpt = res["protocol"]["checkpoint"]
    t = _threshold(ckpt)
    metric_rows = [
        (k, "n/a" if v is None else f"{100 * v:.2f}%") for k, v in res["metrics"].items()
    ]
    body = [
        "<h2>Metrics</h2>",
        _table(metric_rows),
        "<h2>Protocol</h2>",
        _table(list(res["protocol"].items()) + list(res["counts"].items())),
    ]
    if t is not None:
        good, bad = scores[labels == 0], scores[labels == 1]
        body.append(
            _table(
                [
                    ("image threshold (good images only)", f"{t:.6g}"),
                    ("good test images flagged", f"{np.mean(good >= t):.2%}"),
                    ("defective test images caught", f"{np.mean(bad >= t):.2%}"),
                ]
            )
        )
    if labels.any() and not labels.all():
        body += ["<h2>Curves</h2>", _curves(scores, labels)]
    body += [
        "<h2>Scores</h2>",
        _histogram(
            {"good": scores[labels == 0], "defective": scores[labels == 1]}, t, "image scores"
        ),
    ]
    good_rows = sorted((r for r in per if r["label"] == 0), key=lambda r: -r["score"])[:top]
    bad_rows = sorted((r for r in per if r["label"] == 1), key=lambda r: r["score"])[:top]
    body += [
        "<h2>Worst false positives (highest-scoring good images)</h2>",
        LEGEND,
        _overlays(ckpt, good_rows, "good images"),
        "<h2>Worst false negatives (lowest-scoring defective images)</h2>",
        _overlays(ckpt, bad_rows, "defective images"),
    ]
    return html_page(
        f"kdad report: {res['protocol']['model']} on {res['protocol']['data']}", "".join(body)
    )


def unlabelled_report(pred_dir: Path, top: int = 12) -> str:
    lines = [
        json.loads(x)
        for x in (pred_dir / "predictions.jsonl").read_text().splitlines()
        if x.strip()
    ]
    ok = [x for x in lines if x["score"] is not None]
    if not ok:
        raise KdadError(f"{pred_dir}: no scored images in predictions.jsonl")
    scores = np.array([x["score"] for x in ok])
    decided = [x for x in ok if x["decision"]]
    body = [
        "<h2>Summary</h2>",
        _table(
            [
                ("images", len(lines)),
                ("unreadable", len(lines) - len(ok)),
                (
                    "judged defective",
                    sum(x["decision"] == "defect" for x in decided)
                    if decided
                    else "no calibration",
                ),
            ]
        ),
        "<h2>Scores</h2>",
        _histogram({"all images": scores}, None, "image scores"),
        "<h2>Highest-scoring images</h2>",
        "<p>Each at display size with its heatmap; in white the region found.</p>",
    ]
    for x in sorted(ok, key=lambda x: -x["score"])[:top]:
        shown = pred_dir / x["heatmap"] if x["heatmap"] else Path(x["path"])
        rgb = np.asarray(Image.open(shown).convert("RGB"))
        size = _display(rgb)
        rgb = np.asarray(Image.fromarray(rgb).resize(size))
        if x["mask"]:
            found = np.asarray(Image.open(pred_dir / x["mask"]).convert("L")) > 127
            rgb = outline(rgb, _shrunk_mask(found, size), FOUND)
        caption = f"{Path(x['path']).name} score {x['score']:.4g} {x['decision'] or ''}"
        body.append(img_tag(jpeg_uri(Image.fromarray(rgb)), caption, caption, "thumb"))
    return html_page(f"kdad predictions: {pred_dir}", "".join(body))


def build_report(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the report for a run folder, a metrics.json or a predict folder; returns its path."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        page, default = labelled_report(source), source.with_name("report.html")
    elif (source / "metrics.json").is_file():
        page, default = labelled_report(source / "metrics.json"), source / "report.html"
    elif (source / "predictions.jsonl").is_file():
        page, default = unlabelled_report(source), source / "report.html"
    else:
        raise KdadError(f"{source}: no metrics.json or predictions.jsonl to report on")
    path = Path(out) if out else default
    atomic_write(path, lambda tmp: tmp.write_text(page))
    return path
