"""Detection and localisation metrics of the field, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any() and not y.all())


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC of image scores; None when the labels hold one class only."""
    labels = np.asarray(labels).astype(bool)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """Area under the ROC of all pixels pooled over the test set: maps and masks (N, H, W)."""
    y = np.asarray(masks).astype(bool).ravel()
    return float(roc_auc_score(y, np.asarray(maps).ravel())) if _both_classes(y) else None


def pixel_ap(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """Average precision of all pixels pooled over the test set."""
    y = np.asarray(masks).astype(bool).ravel()
    return float(average_precision_score(y, np.asarray(maps).ravel())) if _both_classes(y) else None


def compute_metrics(
    scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray
) -> dict[str, float | None]:
    """Image metrics over all images; pixel metrics over the images given (those with masks)."""
    return {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "pixel_ap": pixel_ap(maps, masks),
    }
