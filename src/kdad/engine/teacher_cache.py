"""The frozen teacher's features of the training images, computed once.

When a model's training inputs are the same every epoch (no augmentation, no synthetic
defects), its teacher would compute the same features again each epoch: on a CPU about 40% of
a distillation step. The cache runs the teacher once over the training set, in index order and
fixed batches (so a resumed run gets exactly the features an unbroken one had), and the
training loop looks up each batch's features by its images' indices and passes them to the
model with the batch (``KDModel.teach``). With synthetic defects the inputs change but their
clean versions do not (``TrainSet.teacher_inputs``): the cache then holds the clean images'
features, looked up by ``clean_index`` and handed over as the batch's ``clean_teacher``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdad.data.dataset import TrainSet

CHUNK = 16  # images per teacher pass while filling the cache


class TeacherCache:
    """Per-stage features (N, C, h, w) of the N training images, looked up by index: the
    index of a batch's inputs (``key`` "index") or of their clean versions ("clean_index")."""

    def __init__(self, feats: list[Tensor], key: str = "index") -> None:
        self.feats, self.key = feats, key

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.feats)

    def features(self, indices: Tensor) -> list[Tensor]:
        """The features of these images (dataset indices, (B,)): each (B, C, h, w)."""
        idx = indices.to(self.feats[0].device)
        return [f[idx].contiguous(memory_format=torch.channels_last) for f in self.feats]

    def attach(self, batch: dict[str, Any]) -> list[Tensor] | None:
        """The features of ``batch``'s inputs, for the model's forward pass; with key
        "clean_index" none, and those of the clean versions go into ``batch["clean_teacher"]``."""
        feats = self.features(batch[self.key])
        if self.key == "index":
            return feats
        batch["clean_teacher"] = feats
        return None


@torch.no_grad()
def build_cache(
    teacher: torch.nn.Module, ds: TrainSet, device: torch.device, budget_bytes: float
) -> TeacherCache | None:
    """The teacher's features of every image whose features repeat (``ds.teacher_inputs``),
    on ``device``; None when there are none or they would take more than ``budget_bytes``."""
    inputs = ds.teacher_inputs()
    if inputs is None:
        return None
    ds, key = inputs
    first = teacher(ds[0]["image"][None].to(device))
    per_image = sum(f[0].numel() * f.element_size() for f in first)
    if per_image * len(ds) > budget_bytes:
        return None
    feats = [
        torch.empty((len(ds), *f.shape[1:]), dtype=f.dtype, device=device).contiguous(
            memory_format=torch.channels_last
        )
        for f in first
    ]
    for batch in DataLoader(ds, batch_size=CHUNK, shuffle=False):
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        for store, f in zip(feats, teacher(x)):
            store[batch["index"].to(device)] = f
    return TeacherCache(feats, key)
