"""What the distillation family shares: the student's decoding, RD's loss, and ``Distiller``,
the base of methods scored by the teacher-student disagreement (per-pixel 1 - cos summed over
scales, smoothed; its max)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdad.models.base import KDModel, Output
from kdad.models.layers import GaussianBlur, cosine_distance_map


class Pair(NamedTuple):
    """Training output of a plain teacher-student: both feature lists, shallowest first."""

    teacher: list[Tensor]  # each (B, C_i, h_i, w_i)
    student: list[Tensor]  # the same shapes


def decode(decoder: nn.ModuleList, x: Tensor) -> list[Tensor]:
    """Run decoder stages from the embedding; their outputs, shallowest first."""
    out = []
    for stage in decoder:
        x = stage(x)
        out.append(x)
    return out[::-1]


def rd_loss(teacher: list[Tensor], student: list[Tensor]) -> list[Tensor]:
    """Per scale: batch mean of 1 - cos between each sample's flattened features."""
    return [
        (1 - torch.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
        for t, s in zip(teacher, student)
    ]


def anomaly_map(teacher: list[Tensor], student: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Sum over scales of per-pixel 1 - cos, bilinearly upsampled to ``size``: (B, H, W)."""
    return sum(cosine_distance_map(t, s, size) for t, s in zip(teacher, student))


class Distiller(KDModel):
    """A method whose map is where student and teacher disagree: per-pixel 1 - cos summed over
    scales, Gaussian-smoothed by its ``sigma`` option; its score the map's max."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blur = GaussianBlur(self.opt.sigma)

    @property
    def score_rule(self) -> str:
        return f"max of the anomaly map (Gaussian-smoothed, sigma {self.opt.sigma:g})"

    def output(self, teacher: list[Tensor], student: list[Tensor], x: Tensor) -> Output:
        """The eval output for input ``x`` (B, 3, H, W): smoothed map (B, H, W), its max."""
        amap = self.blur(anomaly_map(teacher, student, tuple(x.shape[-2:])))
        return Output(amap, amap.flatten(1).amax(1))
