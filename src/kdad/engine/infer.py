"""Batched, streaming inference: batches in, (batch, maps, scores) out, nothing accumulated."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdad.data.dataset import ImageDataset
from kdad.models import KDModel


@torch.inference_mode()
def infer(
    model: KDModel, ds: ImageDataset, batch_size: int = 16, num_workers: int = 0
) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
    """Yield each batch with its anomaly maps (B, h, w) and scores (B,), on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=num_workers):
        out = model(batch["image"].to(device))
        yield batch, out.anomaly_map.float().cpu(), out.score.float().cpu()
