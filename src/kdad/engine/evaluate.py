"""Score a labelled dataset with a model and keep what the metrics need."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdad.config import ScoreConfig
from kdad.engine.infer import infer
from kdad.engine.runtime import Scorer
from kdad.errors import KdadError
from kdad.files import atomic_write
from kdad.metrics import compute_metrics, per_class_image_auroc
from kdad.models import KDModel


@dataclass
class Evaluation:
    """Scores, maps and ground truth of a scored dataset, in dataset order."""

    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) 0 good, 1 defective
    maps: np.ndarray  # (N, h, w) float32
    masks: np.ndarray  # (N, h, w) bool
    has_mask: np.ndarray  # (N,) False for defective images whose mask is unknown
    seconds: float  # inference time

    def metrics(self, sel: np.ndarray | None = None) -> dict[str, float | None]:
        """Every metric over the images ``sel`` (bool (N,); all by default): image ones over
        them all, pixel ones over those with masks."""
        sel = np.ones(len(self.scores), bool) if sel is None else sel
        keep = sel & self.has_mask
        maps, masks = (self.maps, self.masks) if keep.all() else (self.maps[keep], self.masks[keep])
        return compute_metrics(self.scores[sel], self.labels[sel], maps, masks)

    def summary(self, sel: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
        """The images ``sel`` (bool (N,)): their count, every metric, and the image AUROC of the
        good ones against each defect class alone (``classes``: each image's, (N,))."""
        return {
            "images": int(sel.sum()),
            "metrics": self.metrics(sel),
            "image_auroc_per_class": per_class_image_auroc(
                self.scores[sel], self.labels[sel], classes[sel]
            ),
        }

    def save(self, path: str | Path, paths: list[str]) -> None:
        """An .npz anyone can recompute every metric from: maps, masks, labels, scores, paths."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file, so that numpy adds no .npz to the name
                np.savez(
                    f,
                    maps=self.maps,
                    masks=self.masks,
                    labels=self.labels,
                    scores=self.scores,
                    has_mask=self.has_mask,
                    paths=np.array(paths),
                )

        atomic_write(path, write)


def evaluate_model(
    model: KDModel | Scorer, ds: Dataset, batch_size: int = ScoreConfig.batch_size
) -> Evaluation:
    """Run ``model`` (PyTorch, or a scorer on any runtime) over a dataset of dicts with image,
    mask, has_mask, label, index."""
    n = len(ds)
    ev = None
    tic = time.perf_counter()
    for batch, maps, scores in infer(model, ds, batch_size):
        if ev is None:  # sized by the first batch
            shape = (n, *maps.shape[1:])
            ev = Evaluation(
                np.zeros(n, np.float32),
                np.zeros(n, np.int64),
                np.zeros(shape, np.float32),
                np.zeros(shape, bool),
                np.ones(n, bool),
                0,
            )
        i = batch["index"].numpy()
        ev.scores[i], ev.maps[i] = scores.numpy(), maps.numpy()
        ev.masks[i] = batch["mask"].numpy() > 0.5
        ev.labels[i], ev.has_mask[i] = batch["label"].numpy(), batch["has_mask"].numpy()
    if ev is None:
        raise KdadError("nothing to evaluate: the dataset is empty")
    ev.seconds = time.perf_counter() - tic
    return ev
