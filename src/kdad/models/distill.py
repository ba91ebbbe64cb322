"""What the distillation family shares: the student's decoding, RD's loss, and ``Distiller``,
the base of methods scored by the teacher-student disagreement (per-pixel 1 - cos summed over
scales, each scale weighted by its normal level, smoothed; its max)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdad.errors import KdadError
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


def scale_maps(teacher: list[Tensor], student: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Per scale, per-pixel 1 - cos bilinearly upsampled to ``size``: each (B, H, W)."""
    return [cosine_distance_map(t, s, size) for t, s in zip(teacher, student)]


@dataclass
class MapOptions:
    """The map options every ``Distiller`` has (its ``Options`` subclass this)."""

    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, pixels
    scale_norm: bool = True  # each scale's map divided by its mean on held-out good images
    map_stages: list[str] | None = None  # teacher stages the map sums (None: all); all train


class Distiller(KDModel):
    """A method whose map is where student and teacher disagree: per-pixel 1 - cos at each
    scale, weighted and summed, Gaussian-smoothed by its ``sigma`` option; its score the map's
    max.

    The weights (buffer ``scale_weights``, one per teacher scale) are 1, the published plain
    sum, until ``fit_normal`` sets each to 1 / the scale's mean over good images' pixels
    (option ``scale_norm``, on by default). A scale whose map is high on good images, such as a
    shallow one whose features are noisy on a texture, would otherwise drown the others: on
    Magnetic Tile's dev half this raised pixel AUROC by 3-5 points at the same image AUROC
    (docs/benchmarks.md). Checkpoints saved before the buffer existed load with weights 1.

    Option ``map_stages`` leaves scales out of the map while the student still learns them: a
    shallow scale can teach the student's first levels yet only add texture noise to a map
    (the default's ``deep`` student on Magnetic Tile, docs/benchmarks.md).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stages = self.teacher.stages
        keep = stages if self.opt.map_stages is None else list(self.opt.map_stages)
        if not keep or set(keep) - set(stages):
            raise KdadError(f"map_stages must be some of the model's stages {stages}, got {keep}")
        self.map_scales = [i for i, n in enumerate(stages) if n in keep]  # indices summed
        self.blur = GaussianBlur(self.opt.sigma)
        self.register_buffer("scale_weights", torch.ones(len(self.teacher.channels)))  # (S,)
        self.register_load_state_dict_pre_hook(_unit_weights_if_missing)
        self._normal_means: list[Tensor] | None = None  # per-batch scale means while fitting

    @torch.no_grad()
    def fit_normal(self, images: Iterable[Tensor]) -> None:
        """Weight each scale by 1 / its mean 1 - cos over the good ``images``' pixels."""
        if not self.opt.scale_norm:
            return
        self.scale_weights.fill_(1.0)
        self._normal_means = []
        try:
            for x in images:
                self(x)
            means = torch.cat(self._normal_means).mean(0)  # (S,)
        finally:
            self._normal_means = None
        self.scale_weights.copy_(1 / means.clamp_min(1e-6))

    @property
    def score_rule(self) -> str:
        rule = f"max of the anomaly map (Gaussian-smoothed, sigma {self.opt.sigma:g})"
        if self.opt.map_stages is None:
            return rule
        return f"{rule}; the map sums {', '.join(self.opt.map_stages)}"

    def output(self, teacher: list[Tensor], student: list[Tensor], x: Tensor) -> Output:
        """The eval output for input ``x`` (B, 3, H, W): smoothed map (B, H, W), its max."""
        maps = scale_maps(teacher, student, tuple(x.shape[-2:]))
        if self._normal_means is not None:
            self._normal_means.append(torch.stack([m.mean((1, 2)) for m in maps], 1))  # (B, S)
        amap = self.blur(sum(self.scale_weights[i] * maps[i] for i in self.map_scales))
        return Output(amap, amap.flatten(1).amax(1))


def _unit_weights_if_missing(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
) -> None:
    """A state dict from before ``scale_weights`` existed loads as the plain sum it was."""
    state_dict.setdefault(prefix + "scale_weights", torch.ones_like(module.scale_weights))
