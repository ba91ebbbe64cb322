"""Detection and localisation metrics of the field.

Image metrics (a few hundred scores) use scikit-learn directly. Pixel metrics pool every pixel
of the test set (65 M at 1,000 images of 256x256), so they share one descending sort of the
scores, ``PixelCurve``, from which pixel AUROC, AP, F1-max, AUPRO and IAP are all read; the
tests check them against scikit-learn and against direct implementations. scikit-learn is
imported where it is used: it took a third of kdad's import time (0.7 of 2.2 s, measured),
which every `kdad predict` pays, and prediction computes no metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "aupro",
    "iap",
    "iap90",
)
EIGHT = np.ones((3, 3), bool)  # 8-connectivity for defect regions and instances


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any() and not y.all())


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC of image scores; None when the labels hold one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(bool)
    return float(roc_auc_score(y, scores)) if _both_classes(y) else None


def image_ap(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision of image scores (defective = positive)."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(labels).astype(bool)
    return float(average_precision_score(y, scores)) if _both_classes(y) else None


def f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """F1 at each point of a precision-recall curve (0 where both are 0)."""
    return 2 * precision * recall / np.maximum(precision + recall, 1e-12)


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(Best F1 over all thresholds of image scores, the lowest threshold reaching it);
    ``labels`` bool, holding both classes."""
    from sklearn.metrics import precision_recall_curve

    p, r, t = precision_recall_curve(labels, scores)
    f = f1(p[:-1], r[:-1])  # the last point (recall 0) has no threshold
    k = int(np.argmax(f))
    return float(f[k]), float(t[k])


def image_f1max(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Best F1 over all thresholds of image scores."""
    y = np.asarray(labels).astype(bool)
    return best_f1(scores, y)[0] if _both_classes(y) else None


def per_class_image_auroc(
    scores: np.ndarray, labels: np.ndarray, classes: np.ndarray
) -> dict[str, float | None]:
    """Per defect class (``classes``: each image's, (N,)), the image AUROC of its images
    against all the good ones."""
    labels, classes = np.asarray(labels), np.asarray(classes)
    out = {}
    for c in sorted(set(classes[labels == 1].tolist())):
        rows = (classes == c) | (labels == 0)
        out[c] = image_auroc(scores[rows], labels[rows])
    return out


@dataclass
class PixelCurve:
    """Counts at every distinct score of the pooled pixels, from the highest score down.

    ``thresholds[k]``: the k-th distinct score; ``tp[k]``/``fp[k]``: defective/good pixels scoring
    at least that much. Built with one sort, using about 20 bytes a pixel while building.
    """

    thresholds: np.ndarray  # (K,) descending
    tp: np.ndarray  # (K,)
    fp: np.ndarray  # (K,)
    positive_pixels: np.ndarray  # (P,) flat indices of the defective pixels, descending score

    @classmethod
    def build(cls, maps: np.ndarray, masks: np.ndarray) -> PixelCurve:
        s = np.asarray(maps, np.float32).ravel()
        y = np.asarray(masks, bool).ravel()
        index = np.int32 if s.size < 2**31 else np.int64  # halves the memory of counts
        order = np.argsort(-s, kind="stable")
        ranks = np.flatnonzero(y[order])  # (P,) sorted positions of defective pixels
        positive_pixels = order[ranks]
        sorted_s = s[order]
        del order
        last = np.r_[np.flatnonzero(np.diff(sorted_s)), s.size - 1].astype(index)
        tp = np.searchsorted(ranks, last, side="right").astype(index)
        return cls(sorted_s[last], tp, last + 1 - tp, positive_pixels)

    @property
    def positives(self) -> int:
        return int(self.tp[-1])

    @property
    def negatives(self) -> int:
        return int(self.fp[-1])

    def precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.tp + self.fp, 1)

    def auroc(self) -> float:
        tpr = np.r_[0, self.tp] / self.positives
        fpr = np.r_[0, self.fp] / self.negatives
        return float(np.trapezoid(tpr, fpr))

    def ap(self) -> float:
        """Average precision as scikit-learn defines it: sum of (R_k - R_k-1) P_k."""
        recall = np.r_[0, self.tp] / self.positives
        return float(np.sum(np.diff(recall) * self.precision()))

    def f1max(self) -> tuple[float, float]:
        """(best F1, the threshold reaching it)."""
        f = f1(self.precision(), self.tp / self.positives)
        k = int(np.argmax(f))
        return float(f[k]), float(self.thresholds[k])

    def index_of(self, t: np.ndarray) -> np.ndarray:
        """Index of the lowest listed threshold >= each ``t`` (predicting ``score >= t``)."""
        k = np.searchsorted(-self.thresholds, -np.asarray(t, np.float32), side="right") - 1
        return np.maximum(k, 0)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) from 0 to x_max, y interpolated linearly at x_max (MVTec's rule)."""
    i = int(np.searchsorted(x, x_max, side="right"))  # x[:i] <= x_max
    area = float(np.trapezoid(y[:i], x[:i]))
    if i < len(x) and x[i - 1] < x_max:
        y_max = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y[i - 1] + y_max) * (x_max - x[i - 1])
    return area


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels (N, H, W) of 8-connected defect regions, numbered across the whole set."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = EIGHT  # connect within an image, never across images
    labels, n = ndimage.label(np.asarray(masks, bool), structure=structure)
    return labels, n


def aupro(curve: PixelCurve, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD).

    Each 8-connected defect region weighs equally: its pixels add 1 / region size; the PRO at a
    threshold is the mean over regions of the fraction of the region above it.
    """
    labels, n = _regions(masks)
    if n == 0 or curve.negatives == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    region = labels.ravel()[curve.positive_pixels]  # (P,) in descending score order
    cum = np.r_[0.0, np.cumsum(1.0 / (sizes[region] * n))]
    pro = np.r_[0.0, cum[curve.tp]]  # defective pixels above each threshold: the first tp
    fpr = np.r_[0.0, curve.fp / curve.negatives]
    return float(_trapezoid_to(fpr, np.minimum(pro, 1.0), fpr_limit) / fpr_limit)


def instance_thresholds(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per 8-connected ground-truth instance, the highest threshold at which at least half of
    its pixels score >= it (the score of its ceil(n/2)-th highest pixel)."""
    labels, n = _regions(masks)
    flat, lab = np.asarray(maps, np.float32).ravel(), labels.ravel()
    idx = np.flatnonzero(lab)
    idx = idx[np.lexsort((-flat[idx], lab[idx]))]  # by instance, then descending score
    starts = np.searchsorted(lab[idx], np.arange(1, n + 1))
    sizes = np.bincount(lab[idx], minlength=n + 1)[1:]
    return flat[idx[starts + (sizes + 1) // 2 - 1]]


def iap(curve: PixelCurve, maps: np.ndarray, masks: np.ndarray) -> tuple[float, float] | None:
    """(IAP, IAP@90): instance recall against pixel precision (DeSTSeg).

    An instance is found at threshold t when half its pixels score >= t; precision is pixel
    precision over the whole test set at t, made monotone: at recall r, the best precision of any
    threshold reaching recall r or more. IAP is its mean over the recall levels 1/n .. n/n of the
    n instances; IAP@90 its value at 90% recall.
    """
    found = np.sort(instance_thresholds(maps, masks))[::-1]  # recall j/n at found[j-1]
    if len(found) == 0:
        return None
    # Best precision at any threshold <= found[j-1], i.e. at recall j/n or more.
    best = np.maximum.accumulate(curve.precision().astype(np.float32)[::-1])[::-1]
    p = best[curve.index_of(found)].astype(np.float64)
    j90 = int(np.ceil(0.9 * len(found))) - 1
    return float(p.mean()), float(p[j90])


def compute_metrics(
    scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray
) -> dict[str, float | None]:
    """Image metrics over all images; pixel metrics over the (N, H, W) maps given (the images
    with known masks, good ones included)."""
    out: dict[str, float | None] = {
        "image_auroc": image_auroc(scores, labels),
        "image_ap": image_ap(scores, labels),
        "image_f1max": image_f1max(scores, labels),
    }
    masks = np.asarray(masks, bool)
    if not _both_classes(masks):
        return out | dict.fromkeys(
            ["pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "iap", "iap90"]
        )
    curve = PixelCurve.build(maps, masks)
    inst = iap(curve, maps, masks)
    return out | {
        "pixel_auroc": curve.auroc(),
        "pixel_ap": curve.ap(),
        "pixel_f1max": curve.f1max()[0],
        "aupro": aupro(curve, masks),
        "iap": inst[0] if inst else None,
        "iap90": inst[1] if inst else None,
    }
