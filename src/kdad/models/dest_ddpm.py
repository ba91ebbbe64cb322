"""DeST-DDPM: a denoising student and a segmentation head trained on synthetic defects, Perlin
or painted by a DDPM (a seed known from its abstract alone: "unsupervised defect detection
integrating a denoising diffusion probabilistic model with an asymmetric teacher-student
architecture"), built as DeSTSeg (Zhang et al., CVPR 2023), whose official code it follows where
the abstract is silent; docs/models.md lists where it does not.

- Asymmetric teacher-student: the frozen pretrained teacher (RD's) sees the clean image; the
  student, an encoder-decoder (the teacher's architecture randomly initialised up to its deepest
  stage, one more stride-2 residual stage, and a decoder of transposed residual stages back to
  every teacher scale), sees the image with a synthetic defect and must produce the teacher's
  features of the clean one: it learns to denoise, so it keeps reproducing normal features where
  a real defect is and the two streams disagree there. Loss: per-pixel 1 - cos, summed over scales.
- Segmentation head: on the per-scale products of the L2-normalised teacher and student features
  (upsampled to the shallowest scale and concatenated), conv-BN-ReLU, ASPP and a 1x1 conv give
  defect logits, trained on the synthetic masks with focal (gamma 4) plus L1 loss.
- Two phases, as DeSTSeg: the first ``student_share`` of the epochs trains the student, the
  rest the head alone with the student frozen (its BatchNorm statistics too).
- Map: the head's probability, bilinearly upsampled; score: the mean of its top ``top_share``
  pixels (DeSTSeg's 100 highest of 256 x 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.backbones import build_backbone
from kdad.backbones.resnet import make_stage
from kdad.data.dataset import TrainSet
from kdad.errors import KdadError
from kdad.models.base import KDModel, Output, Phase
from kdad.models.distill import decode
from kdad.models.layers import ASPP, conv_bn_relu, kaiming_init, pixel_cosine_loss
from kdad.synth.bank import read_bank
from kdad.synth.datasets import SyntheticTrainSet

# Segmentation-head steps below which training warns: on battery-weld the head had learnt
# nothing after 40 steps and found the validation defects after 60 (DeSTSeg trains it 4000).
MIN_HEAD_STEPS = 100


class Denoised(NamedTuple):
    """Training output: the student's features, and the head's logits in phase two."""

    student: list[Tensor]  # each (B, C_i, h_i, w_i)
    logits: Tensor | None  # (B, 1, h_0, w_0); None in phase one


class DeSTDDPM(KDModel):
    """Teacher on the clean image, denoising student on the defective one, segmentation head
    on their agreement."""

    @dataclass
    class Options:
        defects: str = "perlin"  # perlin | ddpm: where training defects come from
        ddpm_samples: str = field(default="", metadata={"path": True})  # `kdad synth sample`
        defect_prob: float = 0.5  # share of training images given a defect
        student_share: float = 0.5  # share of epochs training the student; then the head
        top_share: float = 100 / 256**2  # of the map's pixels averaged into the score
        head_width: int = 128

    @property
    def score_rule(self) -> str:
        return f"mean of the top {100 * self.opt.top_share:.2g}% of the segmentation map"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.opt
        if opt.defects not in ("perlin", "ddpm"):
            raise KdadError(f"defects must be 'perlin' or 'ddpm', got {opt.defects!r}")
        if opt.defects == "ddpm" and not opt.ddpm_samples:
            raise KdadError("defects: ddpm needs ddpm_samples, a folder from `kdad synth sample`")
        ch = self.teacher.channels
        net = build_backbone(self.teacher.backbone, pretrained=False)
        self.encoder = nn.ModuleList(net.split(self.teacher.stages))
        self.bottleneck = make_stage("basic", ch[-1], ch[-1], 2, 2)
        self.decoder = nn.ModuleList(
            make_stage("basic", cin, cout, 2, 2, transposed=True)
            for cin, cout in zip([ch[-1], *ch[::-1][:-1]], ch[::-1])
        )
        w = opt.head_width
        self.head = nn.Sequential(conv_bn_relu(sum(ch), w), ASPP(w, w), nn.Conv2d(w, 1, 1))
        kaiming_init(self.bottleneck, self.decoder, self.head)

    def phases(self, epochs: int) -> list[Phase]:
        """Phase one trains the student, phase two the head alone; only phase two scores (the
        head is untrained before). Phase one has at least one epoch: a one-epoch run trains
        the student only."""
        head = max(1, round(self.opt.student_share * epochs))
        return [
            Phase("student", 0, scoring=False),
            Phase("head", head, min_steps=MIN_HEAD_STEPS),
        ]

    def train_set(self, images: TrainSet) -> SyntheticTrainSet:
        """The good training images with synthetic defects (Perlin, or the painted bank's
        defects of these images) and their masks."""
        opt = self.opt
        bank = read_bank(opt.ddpm_samples, images.samples) if opt.defects == "ddpm" else None
        return SyntheticTrainSet.around(images, opt.defect_prob, bank)

    def train(self, mode: bool = True) -> DeSTDDPM:
        super().train(mode)
        if self.phase == "head":  # the frozen student keeps its BatchNorm statistics
            for part in (self.encoder, self.bottleneck, self.decoder):
                part.train(False)
        return self

    def student(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> features at the teacher's scales, shallowest first."""
        for piece in self.encoder:
            x = piece(x)
        return decode(self.decoder, self.bottleneck(x))

    def segment(self, t: list[Tensor], s: list[Tensor]) -> Tensor:
        """Teacher and student features -> defect logits (B, 1, h, w) at the shallowest scale."""
        size = t[0].shape[-2:]
        prods = [
            F.interpolate(F.normalize(a, dim=1) * F.normalize(b, dim=1), size=size, mode="bilinear")
            for a, b in zip(t, s)
        ]
        return self.head(torch.cat(prods, 1))

    def forward(self, x: Tensor) -> Denoised | Output:
        """(B, 3, H, W) -> train: Denoised; eval: Output."""
        if self.training and self.phase != "head":
            return Denoised(self.student(x), None)
        with torch.no_grad():
            t, s = self.teacher(x), self.student(x)
        logits = self.segment(t, s)
        if self.training:
            return Denoised(s, logits)
        amap = torch.sigmoid(F.interpolate(logits, size=x.shape[-2:], mode="bilinear"))[:, 0]
        k = max(1, round(self.opt.top_share * amap[0].numel()))
        return Output(amap, amap.flatten(1).topk(k, dim=1).values.mean(1))

    def loss(self, batch: dict[str, Tensor], out: Denoised) -> dict[str, Tensor]:
        logits = out.logits
        if logits is None:
            with torch.no_grad():
                t = self.teacher(batch["clean"])
            pairs = enumerate(zip(t, out.student))
            parts = {f"cos{i}": pixel_cosine_loss(a, b) for i, (a, b) in pairs}
            return {"loss": sum(parts.values()), **parts}
        target = F.interpolate(batch["mask"][:, None].float(), size=logits.shape[-2:], mode="area")
        p = torch.sigmoid(logits)
        pt = torch.where(target > 0.5, p, 1 - p)
        bce = F.binary_cross_entropy_with_logits(logits, (target > 0.5).float(), reduction="none")
        parts = {"focal": ((1 - pt) ** 4 * bce).mean(), "l1": (p - target).abs().mean()}
        return {"loss": parts["focal"] + parts["l1"], **parts}
