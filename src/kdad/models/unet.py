"""STU-Seg's U-Net student, shared: built onto a model (its parts keep the model's own names,
``down``, ``up``, ``sfm``, ``refine``, ``heads``, so checkpoints stay as they were) and run by
``unet_student``. STU-Seg distils into it; DeST-DDPM can denoise with it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.errors import KdadError
from kdad.models.layers import SelectiveFusion, conv_bn_relu, kaiming_init
from kdad.models.teacher import Teacher

UNET_PARTS = ("down", "up", "sfm", "refine", "heads")


class UNetStudent(nn.Module):
    """A mixin for ``KDModel`` subclasses: ``build_unet`` adds the U-Net's parts to the model,
    ``unet_student`` maps an image to features at the teacher's scales and widths."""

    levels: list[int]
    skips: bool

    def build_unet(self, teacher: Teacher, width: int, skips: bool, sfm: bool) -> None:
        """Stride-2 encoder levels (``width`` doubling per level) down to the teacher's deepest
        stride; a decoder climbing back level by level, merging the encoder's feature of each
        level (``skips``; through a Selective Fusion Module with ``sfm``, else concatenated);
        1x1 heads to the teacher's channels at its strides."""
        strides = teacher.strides
        if any(s < 2 or s & (s - 1) for s in strides):
            raise KdadError(f"the U-Net student needs power-of-two teacher strides, got {strides}")
        self.levels = [int(math.log2(s)) - 1 for s in strides]  # U-Net level of each scale
        self.skips = skips
        depth, top = max(self.levels) + 1, min(self.levels)
        widths = [width * 2**j for j in range(depth)]  # level j has stride 2^(j+1)
        self.down = nn.ModuleList(
            nn.Sequential(conv_bn_relu(cin, w, 2), conv_bn_relu(w, w))
            for cin, w in zip([3, *widths[:-1]], widths)
        )
        up_levels = range(depth - 2, top - 1, -1)  # decoder levels, deepest first
        self.up = nn.ModuleList(conv_bn_relu(widths[j + 1], widths[j]) for j in up_levels)
        self.sfm = (
            nn.ModuleList(SelectiveFusion(widths[j], 2) for j in up_levels)
            if skips and sfm
            else None
        )
        concat = skips and not sfm
        self.refine = nn.ModuleList(
            conv_bn_relu(2 * widths[j] if concat else widths[j], widths[j]) for j in up_levels
        )
        self.heads = nn.ModuleList(
            nn.Conv2d(widths[j], c, 1) for j, c in zip(self.levels, teacher.channels)
        )
        kaiming_init(self.down, self.up, self.refine, self.heads)

    def unet_parts(self) -> list[nn.Module]:
        """The student's modules (to freeze them)."""
        return [p for p in (getattr(self, n) for n in UNET_PARTS) if p is not None]

    def unet_student(self, x: Tensor) -> list[Tensor]:
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
            elif self.skips:
                u = torch.cat([u, enc[j]], 1)
            x = self.refine[k](u)
            dec[j] = x
        return [head(dec[j]) for head, j in zip(self.heads, self.levels)]
