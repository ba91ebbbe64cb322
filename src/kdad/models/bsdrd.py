"""BSDRD: dual-student reverse distillation (Tang, Zhang, Liu, "A novel dual-student reverse
knowledge distillation method for magnetic tile defect detection", Scientific Reports 2025,
doi 10.1038/s41598-025-12339-2). Only the abstract is public; docs/models.md says which
sentence each part comes from and what was chosen where it is silent.

- Teacher: RD's frozen encoder, multi-scale features.
- Struct student ("dynamically fuses and compresses multi-scale features"): RD's multi-scale
  fusion with selective-kernel weights over the scales computed from the image's global
  context, then RD's one-class bottleneck and decoder.
- Detail student ("a wavelet transform decomposes high-level features into low- and
  high-frequency components"): a Haar transform of the same fused high-level features, the
  chosen bands compressed by a 3x3 conv to the bottleneck's width, then a light decoder
  (one block per stage).
- MD-GFLoss ("multi-dimensional feature gated fusion loss"): per scale, a gate over channels
  and positions blends the two students; the loss is RD's cosine loss on the blend plus half
  each student's own (so neither student is starved by the gate). The map comes from the blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdad.backbones.resnet import make_stage
from kdad.errors import KdadError
from kdad.models.base import Output
from kdad.models.distill import decode, rd_loss
from kdad.models.layers import GatedFusion, SelectiveFusion, conv_bn_relu, haar_dwt, kaiming_init
from kdad.models.rd import RD

BANDS = ("LL", "LH", "HL", "HH")


class Dual(NamedTuple):
    """Training output: the teacher's features, each student's and their blend."""

    teacher: list[Tensor]  # each (B, C_i, h_i, w_i)
    struct: list[Tensor]  # the same shapes
    detail: list[Tensor] | None  # the same shapes; None without the detail student
    blend: list[Tensor]  # the same shapes


class BSDRD(RD):
    """RD's struct student with dynamic scale fusion + a wavelet detail student, gated."""

    @dataclass
    class Options(RD.Options):
        dynamic_fusion: bool = True  # struct student: learned weights over scales
        detail: bool = True  # the detail student (off: struct student alone)
        bands: tuple[str, ...] = BANDS  # Haar bands the detail student sees
        gated_fusion: bool = True  # MD-GFLoss gate (off: the two students averaged)
        aux_weight: float = 0.5  # weight of each student's own loss beside the blend's

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.opt
        ch = self.teacher.channels
        n, c_last, c_emb = len(ch), ch[-1], 2 * ch[-1]
        self.scale_attention = SelectiveFusion(c_last, n) if opt.dynamic_fusion else None
        if opt.detail:
            if not opt.bands or set(opt.bands) - set(BANDS):
                raise KdadError(f"bands must be a non-empty subset of {BANDS}, got {opt.bands}")
            self.band_index = [BANDS.index(b) for b in opt.bands]
            self.detail_in = conv_bn_relu(len(opt.bands) * n * c_last, c_emb)
            self.detail_decoder = nn.ModuleList(
                make_stage("bottleneck", cin, cout, 1, 2, transposed=True, width_factor=1.0)
                for cin, cout in zip([c_emb, *ch[::-1][:-1]], ch[::-1])
            )
            kaiming_init(self.detail_in, self.detail_decoder)
            self.gates = nn.ModuleList(GatedFusion(c) for c in ch) if opt.gated_fusion else None

    def _fused(self, feats: list[Tensor]) -> Tensor:
        """Multi-scale features at the deepest scale, weighted per scale: (B, n C_last, h, w)."""
        xs = [f(x) for f, x in zip(self.fuse, feats)] + [feats[-1]]  # each (B, C_last, h, w)
        if self.scale_attention is not None:
            w = self.scale_attention.weights(xs)  # (B, n, C_last, 1, 1), sums to 1 over n
            xs = [x * w[:, i] * len(xs) for i, x in enumerate(xs)]  # mean weight stays 1
        return torch.cat(xs, 1)

    def students(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor] | None]:
        """Struct and detail students' features, shallowest first (detail None when off)."""
        fused = self._fused(feats)
        struct = decode(self.decoder, self.ocbe(fused))
        if not self.opt.detail:
            return struct, None
        bands = haar_dwt(fused)  # 4 x (B, n C_last, h/2, w/2)
        x = self.detail_in(torch.cat([bands[i] for i in self.band_index], 1))  # (B, 2C, h/2, w/2)
        return struct, decode(self.detail_decoder, x)

    def blend(self, struct: list[Tensor], detail: list[Tensor] | None) -> list[Tensor]:
        """The students' combined features per scale."""
        if detail is None:
            return struct
        if self.gates is None:
            return [(a + b) / 2 for a, b in zip(struct, detail)]
        return [g(a, b) for g, a, b in zip(self.gates, struct, detail)]

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Dual | Output:
        """(B, 3, H, W) -> train: Dual; eval: Output."""
        t = self.teach(x, teacher)
        struct, detail = self.students(t)
        s = self.blend(struct, detail)
        if self.training:
            return Dual(t, struct, detail, s)
        return self.output(t, s, x)

    def loss(self, batch: dict[str, Tensor], out: Dual) -> dict[str, Tensor]:
        parts = {"blend": sum(rd_loss(out.teacher, out.blend))}
        total = parts["blend"]
        if out.detail is not None:
            parts["struct"] = sum(rd_loss(out.teacher, out.struct))
            parts["detail"] = sum(rd_loss(out.teacher, out.detail))
            total = total + self.opt.aux_weight * (parts["struct"] + parts["detail"])
        return {"loss": total, **parts}
