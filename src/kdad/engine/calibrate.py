"""Thresholds and normalisation from held-out good training images only.

Image threshold: the score that the target share of good parts exceeds (default 1%). Pixel
threshold: a high quantile of good pixels (default 99.9%). Normalisation maps a raw value v
linearly so that the lowest good value is 0, the threshold 0.5 and twice the threshold's
distance 1 (clipped): ``clip(0.5 (v - low) / (threshold - low), 0, 1)``. A part is a defect when
its normalised score is >= 0.5, a pixel when its normalised map value is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from kdad.errors import KdadError
from kdad.metrics import best_f1


def calibrate(
    scores: np.ndarray,
    maps: np.ndarray,
    false_alarm_rate: float = 0.01,
    pixel_quantile: float = 0.999,
) -> dict[str, Any]:
    """Calibration from good images' scores (N,) and maps (N, H, W); plain data for checkpoints."""
    if len(scores) == 0:
        raise KdadError("calibration needs at least one held-out good image")
    if not 0 < false_alarm_rate < 1 or not 0 < pixel_quantile < 1:
        raise KdadError("false_alarm_rate and pixel_quantile must be in (0, 1)")
    scores = np.asarray(scores, np.float64)
    maps = np.asarray(maps, np.float32)
    image_t = float(np.quantile(scores, 1 - false_alarm_rate))
    pixel_t = float(np.quantile(maps, pixel_quantile))
    return {
        "image_threshold": image_t,
        "image_low": float(min(scores.min(), image_t - 1e-6)),
        "pixel_threshold": pixel_t,
        "pixel_low": float(min(maps.min(), pixel_t - 1e-6)),
        "false_alarm_rate": false_alarm_rate,
        "pixel_quantile": pixel_quantile,
        "images": len(scores),
    }


def normalise(v: Tensor | np.ndarray, threshold: float, low: float) -> Tensor | np.ndarray:
    """Raw scores or maps to [0, 1] with ``threshold`` at 0.5 (see the module docstring).

    Only operations that numpy and torch share, so the ONNX export runs this very function.
    """
    return unclipped(v, threshold, low).clip(0, 1)


def unclipped(
    v: Tensor | np.ndarray | float, threshold: float, low: float
) -> Tensor | np.ndarray | float:
    """The normalised scale without its clip: 0.5 at the threshold, 1 at twice its distance
    from the lowest good value, 3 at six times: how far past the threshold a part is."""
    return 0.5 * (v - low) / (threshold - low)


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The image threshold maximising F1 on an explicitly labelled validation set."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise KdadError("an F1 threshold needs both good and defective validation images")
    return best_f1(scores, labels)[1]
