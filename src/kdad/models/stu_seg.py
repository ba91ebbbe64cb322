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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.errors import KdadError
from kdad.models.base import Output
from kdad.models.distill import Distiller, MapOptions, Pair
from kdad.models.layers import (
    SelectiveFusion,
    conv_bn_relu,
    kaiming_init,
    pixel_cosine_loss,
)


class STUSeg(Distiller):
    """Frozen teacher; U-Net student on the image; anomaly = 1 - cos(teacher, student)."""

    @dataclass
    class Options(MapOptions):
        width: int = 32  # channels of the U-Net's first level (stride 2), doubled per level
        skips: bool = True  # skip connections from the encoder (off: a plain encoder-decoder)
        sfm: bool = True  # Selective Fusion Module at each merge (off: concatenation)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.opt
        strides = self.teacher.strides
        if any(s < 2 or s & (s - 1) for s in strides):
            raise KdadError(f"STU-Seg needs power-of-two teacher strides, got {strides}")
        self.levels = [int(math.log2(s)) - 1 for s in strides]  # U-Net level of each scale
        depth, top = max(self.levels) + 1, min(self.levels)
        widths = [opt.width * 2**j for j in range(depth)]  # level j has stride 2^(j+1)
        self.down = nn.ModuleList(
            nn.Sequential(conv_bn_relu(cin, w, 2), conv_bn_relu(w, w))
            for cin, w in zip([3, *widths[:-1]], widths)
        )
        up_levels = range(depth - 2, top - 1, -1)  # decoder levels, deepest first
        self.up = nn.ModuleList(conv_bn_relu(widths[j + 1], widths[j]) for j in up_levels)
        self.sfm = (
            nn.ModuleList(SelectiveFusion(widths[j], 2) for j in up_levels)
            if opt.skips and opt.sfm
            else None
        )
        concat = opt.skips and not opt.sfm
        self.refine = nn.ModuleList(
            conv_bn_relu(2 * widths[j] if concat else widths[j], widths[j]) for j in up_levels
        )
        self.heads = nn.ModuleList(
            nn.Conv2d(widths[j], c, 1) for j, c in zip(self.levels, self.teacher.channels)
        )
        kaiming_init(self.down, self.up, self.refine, self.heads)

    def student(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> features at the teacher's scales and widths, in its order."""
        enc = []
        for level in self.down:
            x = level(x)
            enc.append(x)  # level j: (B, width 2^j, H / 2^(j+1), W / 2^(j+1))
        dec = {len(enc) - 1: x}
        for k, j in enumerate(range(len(enc) - 2, min(self.levels) - 1, -1)):
            u = self.up[k](F.interpolate(x, size=enc[j].shape[-2:], mode="bilinear"))
            if self.sfm is not None:
                u = self.sfm[k]([u, enc[j]])
            elif self.opt.skips:
                u = torch.cat([u, enc[j]], 1)
            x = self.refine[k](u)
            dec[j] = x
        return [head(dec[j]) for head, j in zip(self.heads, self.levels)]

    def forward(self, x: Tensor) -> Pair | Output:
        """(B, 3, H, W) -> train: teacher and student features; eval: Output."""
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        if self.training:
            return Pair(t, s)
        return self.output(t, s, x)

    def loss(self, batch: dict[str, Tensor], out: Pair) -> dict[str, Tensor]:
        pairs = enumerate(zip(out.teacher, out.student))
        parts = {f"cos{i}": pixel_cosine_loss(t, s) for i, (t, s) in pairs}
        return {"loss": sum(parts.values()), **parts}
