"""SSPCAB+SimAM KD: a teacher-student whose student carries a self-supervised predictive
convolutional attentive block and parameter-free SimAM attention (Zhou, Sui, Zhang, Wang,
"Industrial product surface defect detection based on self supervised convolution and parameter
free attention mechanism", Journal of Shandong University (Engineering Science) 2025,
55(4):40-47). Only the abstract is public; docs/models.md says which sentence each part comes
from and what was chosen where it is silent.

- "Knowledge distillation from a teacher to a student network": STPM's scheme (the abstract
  names no other): the student has the teacher's architecture up to its deepest feature stage,
  randomly initialised, sees the image, and must match the frozen teacher's features at each
  scale; per-pixel 1 - cos loss, summed over scales.
- "A parameter-free attention mechanism (SimAM)": after each student stage, inside the flow, so
  later stages see the re-weighted features.
- "A self-supervised predictive convolutional attentive block (SSPCAB)": on the student's
  deepest feature, whose every position is then predicted from its context only; its own
  reconstruction loss (MSE to its input) is added with weight ``sspcab_weight`` (0.1, as in the
  SSPCAB paper's experiments).
- Map and score as RD: per-pixel 1 - cos summed over scales, Gaussian-smoothed; score its max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from kdad.backbones import build_backbone
from kdad.models.base import Output
from kdad.models.distill import Distiller, MapOptions
from kdad.models.layers import SSPCAB, SimAM, pixel_cosine_loss


class Attentive(NamedTuple):
    """Training output: features, and the student's deepest one before SSPCAB."""

    teacher: list[Tensor]  # each (B, C_i, h_i, w_i)
    student: list[Tensor]  # the same shapes
    before_sspcab: Tensor  # (B, C_last, h, w)


class SSPCABKD(Distiller):
    """Frozen teacher; a student of the same architecture with SimAM and SSPCAB inside."""

    @dataclass
    class Options(MapOptions):
        sspcab: bool = True  # SSPCAB on the deepest student feature
        simam: bool = True  # SimAM after each student stage
        sspcab_weight: float = 0.1  # weight of SSPCAB's reconstruction loss

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.opt
        net = build_backbone(self.teacher.backbone, pretrained=False)
        self.student = nn.ModuleList(net.split(self.teacher.stages))
        for m in self.student.modules():  # trained from scratch: torch's default BN momentum
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        self.simam = SimAM() if opt.simam else None
        self.sspcab = SSPCAB(self.teacher.channels[-1]) if opt.sspcab else None

    def students(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> (student features per teacher stage, the deepest before SSPCAB)."""
        feats = []
        for piece in self.student:
            x = piece(x)
            if self.simam is not None:
                x = self.simam(x)
            feats.append(x)
        if self.sspcab is not None:
            feats[-1] = self.sspcab(x)
        return feats, x

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Attentive | Output:
        """(B, 3, H, W) -> train: Attentive; eval: Output."""
        t = self.teach(x, teacher)
        s, pre = self.students(x)
        if self.training:
            return Attentive(t, s, pre)
        return self.output(t, s, x)

    def loss(self, batch: dict[str, Tensor], out: Attentive) -> dict[str, Tensor]:
        pairs = enumerate(zip(out.teacher, out.student))
        parts = {f"cos{i}": pixel_cosine_loss(a, b) for i, (a, b) in pairs}
        total = sum(parts.values())
        if self.sspcab is not None:
            parts["sspcab"] = SSPCAB.loss(out.student[-1], out.before_sspcab)
            total = total + self.opt.sspcab_weight * parts["sspcab"]
        return {"loss": total, **parts}
