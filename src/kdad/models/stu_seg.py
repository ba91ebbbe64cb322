"""STU-Seg: a heterogeneous teacher-student whose student is a U-Net with skip connections and
a Selective Fusion Module ("Knowledge Distillation with Selective Fusion Module for Industrial
Defect Detection", Xi'an University of Posts and Telecommunications, 2026). Only the abstract is
public; docs/models.md says which sentence each part comes from and what was chosen where it is
silent.

- "A heterogeneous student-teacher architecture": the frozen pretrained teacher (RD's) and a
  student of another kind, a plain convolutional U-Net trained from scratch on the image.
- "The student is reconstructed into a U-Net with skip connections, reusing shallow
  high-resolution features": an encoder of stride-2 levels (width doubling per level) down to
  the teacher's deepest stride, and a decoder that climbs back level by level, merging each
  upsampled deeper feature with the encoder's feature of the same level; 1x1 heads map the
  levels at the teacher's strides to the teacher's channels.
- "A Selective Fusion Module adjusts the weights of the different feature levels dynamically
  from the global context": at every merge, SK-style attention (``SelectiveFusion``) weighs the
  deep and the shallow feature per channel from their pooled sum, weights summing to one.
- Loss and map (the abstract is silent): STPM's per-pixel loss, mean 1 - cos per scale, summed;
  the map is RD's, per-pixel 1 - cos summed over scales, Gaussian-smoothed; score its max.
- Option ``seg_head`` (off by default, not in the abstract): the paper reports pixel AP and IAP,
  the metrics of DeSTSeg, which segments with a head trained on synthetic defects. With it on,
  training has DeST-DDPM's two phases: the student as above on the good images (those of the
  defective half of each batch do not count: the training set now carries synthetic defects),
  then DeSTSeg's head alone on teacher-student agreement, with the student frozen; the map is
  the head's, the score the mean of its top pixels (``models/seghead.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.data.dataset import TrainSet
from kdad.models.base import Output, Phase
from kdad.models.distill import Distiller, MapOptions, Pair
from kdad.models.layers import (
    kaiming_init,
    pixel_cosine_loss,
)
from kdad.models.seghead import (
    HeadOptions,
    Logits,
    SegHead,
    check_defects,
    defect_set,
    head_loss,
    head_output,
    head_phases,
    head_score_rule,
)
from kdad.models.unet import UNetStudent


class STUSeg(Distiller, UNetStudent):
    """Frozen teacher; U-Net student on the image; anomaly = 1 - cos(teacher, student)."""

    @dataclass
    class Options(MapOptions, HeadOptions):
        width: int = 32  # channels of the U-Net's first level (stride 2), doubled per level
        skips: bool = True  # skip connections from the encoder (off: a plain encoder-decoder)
        sfm: bool = True  # Selective Fusion Module at each merge (off: concatenation)
        seg_head: bool = False  # DeSTSeg's head on synthetic defects gives the map (HeadOptions)
        student_share: float = 0.5  # with seg_head: STU-Seg's student is the method, not a fifth

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.opt
        self.build_unet(self.teacher, opt.width, opt.skips, opt.sfm)
        self.head = None
        if opt.seg_head:
            check_defects(opt)
            self.head = SegHead(self.teacher.channels, opt.head_width)
            kaiming_init(self.head)

    @property
    def score_rule(self) -> str:
        return head_score_rule(self.opt) if self.head is not None else super().score_rule

    def phases(self, epochs: int) -> list[Phase]:
        return head_phases(self.opt, epochs) if self.head is not None else super().phases(epochs)

    def train_set(self, images: TrainSet, folder: Path, progress: bool) -> TrainSet:
        if self.head is None:
            return images
        return defect_set(self.opt, images, folder, self.head[-1].weight.device, progress)

    def fit_normal(self, images: Iterable[Tensor]) -> None:
        """The scales' weights, unless the head's map replaces theirs."""
        if self.head is None:
            super().fit_normal(images)

    def train(self, mode: bool = True) -> STUSeg:
        super().train(mode)
        if self.phase == "head":  # the frozen student keeps its BatchNorm statistics
            for part in self.unet_parts():
                part.train(False)
        return self

    def student(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> features at the teacher's scales and widths, in its order."""
        return self.unet_student(x)

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Pair | Logits | Output:
        """(B, 3, H, W) -> train: teacher and student features, or the head's logits in its
        phase; eval: Output."""
        t = self.teach(x, teacher)
        if self.head is not None and (self.phase == "head" or not self.training):
            with torch.no_grad():
                s = self.student(x)
            logits = self.head.segment(t, s)
            if self.training:
                return Logits(logits)
            return head_output(logits, tuple(x.shape[-2:]), self.opt.top_share)
        s = self.student(x)
        if self.training:
            return Pair(t, s)
        return self.output(t, s, x)

    def loss(self, batch: dict[str, Tensor], out: Pair | Logits) -> dict[str, Tensor]:
        if isinstance(out, Logits):
            return head_loss(out.logits, batch["mask"])
        pairs = enumerate(zip(out.teacher, out.student))
        if self.head is None:
            parts = {f"cos{i}": pixel_cosine_loss(t, s) for i, (t, s) in pairs}
        else:  # the student learns from the good images only: weights (B,) on them
            w = (batch["label"] == 0).float()
            w = w / w.sum().clamp_min(1)
            parts = {
                f"cos{i}": (w * (1 - F.cosine_similarity(t, s, dim=1)).mean((1, 2))).sum()
                for i, (t, s) in pairs
            }
        return {"loss": sum(parts.values()), **parts}
