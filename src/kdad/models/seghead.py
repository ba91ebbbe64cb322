"""DeSTSeg's segmentation head on teacher-student agreement, trained on synthetic defects: what
DeST-DDPM and STU-Seg's ``seg_head`` option share (its options, the defects it trains on, the
head, its loss, its map and score, and the two training phases)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.backbones.resnet import make_stage
from kdad.data.dataset import TrainSet
from kdad.errors import KdadError
from kdad.models.base import LR_SCHEDULES, Output, Phase
from kdad.models.layers import ASPP, conv_bn_relu
from kdad.synth.bank import read_bank
from kdad.synth.datasets import SyntheticTrainSet
from kdad.synth.perlin import MAX_THRESHOLD

# Segmentation-head steps below which training warns: on battery-weld the head had learnt
# nothing after 40 steps and found the validation defects after 60 (DeSTSeg trains it 4000).
MIN_HEAD_STEPS = 100


@dataclass
class HeadOptions:
    """Where the head's training defects come from, how the epochs split, how it scores."""

    defects: str = "ddpm"  # ddpm | perlin: where training defects come from
    ddpm_samples: str = field(default="", metadata={"path": True})  # a bank; "": paint one
    ddpm_steps: int = 2000  # DDPM training steps when painting a bank
    ddpm_count: int = 200  # defects painted into the bank
    defect_prob: float = 0.5  # share of training images given a defect
    bank_share: float = 1.0  # with defects ddpm: share of defects from the bank; the rest Perlin
    # Perlin masks' noise threshold, drawn in [lo, hi] per defect: 0.5 (DRAEM's) covers 3-8% of
    # the image, 0.1 about 37%
    mask_thresholds: tuple[float, float] = (0.5, 0.5)
    student_share: float = 0.2  # share of epochs training the student (DeSTSeg's); then the head
    top_share: float = 100 / 256**2  # of the map's pixels averaged into the score
    head_width: int = 64  # DeSTSeg's 256 costs 10-13x as much a step on a CPU (docs/models.md)
    # the head phase's learning rate: constant | cosine (to ~0 by its end); None: the run's
    # (train.lr_schedule)
    head_lr_schedule: str | None = None


def check_defects(opt: HeadOptions) -> None:
    """A clear error for a bad defect source or setting."""
    if opt.defects not in ("perlin", "ddpm"):
        raise KdadError(f"defects must be 'perlin' or 'ddpm', got {opt.defects!r}")
    if opt.ddpm_steps < 1 or opt.ddpm_count < 1:
        raise KdadError("ddpm_steps and ddpm_count must be at least 1")
    if not 0 <= opt.bank_share <= 1:
        raise KdadError(f"bank_share must be in [0, 1], got {opt.bank_share}")
    check_thresholds("mask_thresholds", opt.mask_thresholds)
    if opt.head_lr_schedule is not None and opt.head_lr_schedule not in LR_SCHEDULES:
        names = " or ".join(LR_SCHEDULES)
        raise KdadError(f"head_lr_schedule must be {names}, got {opt.head_lr_schedule!r}")


def check_thresholds(name: str, value: object) -> None:
    """A clear error unless ``value`` is a range [lo, hi] of Perlin mask thresholds."""
    t = list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = len(t) == 2 and all(isinstance(x, (int, float)) for x in t)
    if not numbers or not 0 <= t[0] <= t[1] <= MAX_THRESHOLD:
        raise KdadError(
            f"{name} must be [lo, hi] with 0 <= lo <= hi <= {MAX_THRESHOLD}, got {value!r}"
        )


def head_score_rule(opt: HeadOptions) -> str:
    """The head's image score, for results tables."""
    return f"mean of the top {100 * opt.top_share:.2g}% of the segmentation map"


def head_phases(opt: HeadOptions, epochs: int) -> list[Phase]:
    """Phase one trains the student, phase two the head alone (at ``head_lr_schedule``); only
    phase two scores (the head is untrained before). Phase one has at least one epoch: a
    one-epoch run trains the student only."""
    head = max(1, round(opt.student_share * epochs))
    return [
        Phase("student", 0, scoring=False),
        Phase("head", head, min_steps=MIN_HEAD_STEPS, lr_schedule=opt.head_lr_schedule),
    ]


def defect_set(
    opt: HeadOptions,
    images: TrainSet,
    folder: Path,
    device: torch.device,
    progress: bool,
    wide: tuple[float, float] | None = None,
) -> SyntheticTrainSet:
    """The good training images with synthetic defects and their masks: Perlin ones, or those
    of a DDPM-painted bank, ``ddpm_samples`` or else one painted from these images into the run
    ``folder`` (``synth.diffusion.paint_bank``: made once, reused on resume). Given ``wide``,
    the epochs of the phase ``wide`` (a second head's) draw Perlin masks of thresholds in it."""
    bank = None
    if opt.defects == "ddpm":
        source = Path(opt.ddpm_samples) if opt.ddpm_samples else None
        if source is None:  # DDPM training code, imported only when a bank is painted
            from kdad.synth.diffusion import paint_bank

            steps, count, seed = opt.ddpm_steps, opt.ddpm_count, images.seed
            size, dev = images.size, str(device)
            source = paint_bank(images.samples, size, folder, steps, count, seed, dev, progress)
        bank = read_bank(source, images.samples)
    thresholds = tuple(opt.mask_thresholds)
    wide = tuple(wide) if wide else None
    return SyntheticTrainSet.around(images, opt.defect_prob, bank, opt.bank_share, thresholds, wide)


class Logits(NamedTuple):
    """Training output of the head phase: defect logits (B, 1, h, w)."""

    logits: Tensor


class SegHead(nn.Sequential):
    """DeSTSeg's segmentation network: the per-scale products of the L2-normalised teacher and
    student features, negated, upsampled to the shallowest scale and concatenated -> two basic
    residual blocks to ``width`` channels, ASPP, conv-BN-ReLU, 1x1 conv -> defect logits. With
    ``self_reference`` k, the teacher's ``self_distance`` at its k shallowest scales joins the
    products (not in DeSTSeg)."""

    def __init__(self, channels: list[int], width: int, self_reference: int = 0) -> None:
        extra = min(self_reference, len(channels))  # a self_distance map per scale
        super().__init__(
            make_stage("basic", sum(channels) + extra, width, 2, 1),
            ASPP(width, width),
            conv_bn_relu(width, width),
            nn.Conv2d(width, 1, 1),
        )
        self.self_reference = self_reference

    def segment(self, t: list[Tensor], s: list[Tensor]) -> Tensor:
        """Teacher and student features -> defect logits (B, 1, h, w) at the shallowest scale."""
        size = t[0].shape[-2:]
        prods = [
            F.interpolate(
                -F.normalize(a, dim=1) * F.normalize(b, dim=1), size=size, mode="bilinear"
            )
            for a, b in zip(t, s)
        ]
        for a in t[: self.self_reference]:  # the shallowest scales
            prods.append(F.interpolate(self_distance(a), size=size, mode="bilinear"))
        return self(torch.cat(prods, 1))


def self_distance(feats: Tensor) -> Tensor:
    """Each position's feature against its own image's median feature, 1 - cos: a place that
    differs from the rest of its part, whatever other parts look like. (B, C, h, w) -> (B, 1,
    h, w). The lower median per channel, as torch.median's; sorting exports to ONNX, median
    does not."""
    flat = feats.flatten(2)  # (B, C, h * w)
    median = flat.sort(2).values[..., (flat.shape[2] - 1) // 2, None, None]  # (B, C, 1, 1)
    return 1 - F.cosine_similarity(feats, median.expand_as(feats), dim=1)[:, None]


def head_map(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """The head's probability (B, 1, h, w) -> upsampled to ``size``, (B, H, W)."""
    return torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear"))[:, 0]


def head_output(logits: Tensor, size: tuple[int, int], top_share: float) -> Output:
    """The head's map (``head_map``); score: the mean of its top ``top_share`` pixels."""
    amap = head_map(logits, size)
    k = max(1, round(top_share * amap[0].numel()))
    return Output(amap, amap.flatten(1).topk(k, dim=1).values.mean(1))


def head_loss(logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """DeSTSeg's loss: focal (gamma 4) plus L1 of the head's probability, against the synthetic
    masks (B, H, W) resized bilinearly to the logits (B, 1, h, w) and binarised at 0.5."""
    target = F.interpolate(mask[:, None].float(), size=logits.shape[-2:], mode="bilinear")
    target = (target >= 0.5).float()
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0, p, 1 - p)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    parts = {"focal": ((1 - pt) ** 4 * bce).mean(), "l1": (p - target).abs().mean()}
    return {"loss": parts["focal"] + parts["l1"], **parts}
