"""Batched, streaming inference: batches in, (batch, maps, scores) out, nothing accumulated;
and the model's fit on good images, which runs the same way."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdad.config import ScoreConfig
from kdad.data.dataset import ImageDataset
from kdad.engine.runtime import Scorer, as_scorer
from kdad.models import KDModel


@torch.inference_mode()
def infer(
    model: KDModel | Scorer,
    ds: ImageDataset,
    batch_size: int = ScoreConfig.batch_size,
    num_workers: int = 0,
) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
    """Yield each batch with its anomaly maps (B, h, w) and scores (B,), on the CPU, from a
    model (PyTorch) or a scorer on any runtime."""
    score = as_scorer(model)
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=num_workers):
        out = score(batch["image"])
        yield batch, out.anomaly_map, out.score


@torch.inference_mode()
def fit_normal(model: KDModel, ds: Dataset, batch_size: int = ScoreConfig.batch_size) -> None:
    """Let ``model`` fit what it estimates from the good images of ``ds``
    (``KDModel.fit_normal``): held-out good training images, never test images."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(ds, batch_size=batch_size)
    model.fit_normal(batch["image"].to(device) for batch in loader)
