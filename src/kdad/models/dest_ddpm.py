"""DeST-DDPM: a denoising student and a segmentation head trained on synthetic defects, Perlin
or painted by a DDPM (a seed known from its abstract alone: "unsupervised defect detection
integrating a denoising diffusion probabilistic model with an asymmetric teacher-student
architecture"), built as DeSTSeg (Zhang et al., CVPR 2023), whose official code it follows where
the abstract is silent; docs/models.md lists where it does not.

- Asymmetric teacher-student: the frozen pretrained teacher (RD's) sees the clean image; the
  student sees the image with a synthetic defect and must produce the teacher's features of the
  clean one: it learns to denoise, so it keeps reproducing normal features where a real defect
  is and the two streams disagree there. Loss: per-pixel 1 - cos, summed over scales. The
  student (``student``) is by default STU-Seg's U-Net without skips (``models/unet.py``, width
  ``unet_width``), the student of kdad's default on Magnetic Tile; ``destseg`` is DeSTSeg's:
  the teacher's architecture randomly initialised up to its deepest stage, one more stride-2
  residual stage, then two basic residual blocks at that scale and at each teacher scale,
  climbing by bilinear upsampling.
- Training defects: Perlin by default (DeSTSeg's), since defects painted by a DDPM of the good
  images helped on neither dataset kdad holds (docs/models.md). With ``defects: ddpm`` (the
  abstract's method) a DDPM trained in the run paints a bank, and half the defects come from it,
  half Perlin (``bank_share``; not in DeSTSeg, nor, as far as its abstract says, in DeST-DDPM).
- Stages: by default the backbone's deep ones (strides 4-32; DeSTSeg's are 4-16): the student
  learns all, the head and the student's map use those of stride 8 or more (``map_stages``).
- Segmentation head, DeSTSeg's (``models/seghead.py``): on the negated per-scale products of the
  L2-normalised teacher and student features, two residual blocks, ASPP, conv-BN-ReLU and a 1x1
  conv give defect logits, trained on the binarised synthetic masks with focal (gamma 4) plus
  L1 loss. Its width is 64 where DeSTSeg's is 256, for the CPU's sake (docs/models.md).
- Two phases, as DeSTSeg: the first ``student_share`` of the epochs trains the student, the
  rest the head alone with the student frozen (its BatchNorm statistics too). With epochs auto
  the student gets the family's 2400 steps and the head the rest (``schedule_steps``).
- Map (``map``) and score (``image_score``): DeSTSeg's (``head``) are the head's probability,
  bilinearly upsampled, and the mean of its top ``top_share`` pixels (DeSTSeg's 100 highest of
  256 x 256). By default (``both``, not in DeSTSeg) each adds the denoising student's own
  disagreement with the teacher (RD's map: 1 - cos per scale, each scale weighted by 1 / its
  mean on held-out good images, summed, smoothed; its max for the score), the two maps and the
  two scores each standardised by their mean and standard deviation on the held-out good
  training images (the maps over their pixels).
- Two heads (``wide_head``, not in DeSTSeg): a second head, trained after the first (which is
  then frozen) in a phase of its own on wide Perlin masks; the map averages the two heads'
  standardised maps before adding the student's, the image score stays the first head's. Wide
  masks find the wide regions DRAEM's miss, and alone cost small defects (docs/models.md).

docs/models.md gives the measurements behind each departure from DeSTSeg.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.backbones import build_backbone
from kdad.backbones.resnet import make_stage
from kdad.data.dataset import TrainSet
from kdad.errors import KdadError
from kdad.models.base import KDModel, Output, Phase
from kdad.models.layers import GaussianBlur, kaiming_init, pixel_cosine_loss
from kdad.models.seghead import (
    HeadOptions,
    SegHead,
    check_defects,
    check_thresholds,
    defect_set,
    head_loss,
    head_map,
    head_output,
    head_phases,
    head_score_rule,
)
from kdad.models.unet import UNetStudent
from kdad.synth.datasets import SyntheticTrainSet

STUDENT_SIGMA = 4.0  # smoothing of the student's map, pixels (the family's, models.distill)
MAP_STRIDE = 8  # by default the head and the student's map use the stages this coarse or more
HEAD_ONLY = torch.tensor([0.0, 1.0, 0.0, float("inf")])  # normal statistics scoring by the head


@dataclass
class DeSTOptions(HeadOptions):
    """The head's options, and how images are scored."""

    # perlin by default: 3 seeds on each dataset, DDPM-painted defects helped on neither beyond
    # the seeds' spread (docs/models.md); ddpm paints them
    defects: str = "perlin"
    image_score: str = "both"  # head: DeSTSeg's | both: plus the student's, standardised
    map: str = "both"  # head: DeSTSeg's | both: plus the student's, standardised
    student: str = "unet"  # unet: STU-Seg's U-Net | destseg: the teacher's architecture
    unet_width: int = 16  # with student unet: its first level's channels (no skips: a denoiser)
    # teacher stages the head and the student's map use; None: those of stride 8 or more
    map_stages: list[str] | None = None
    # share of epochs training the student: with epochs auto it gets the family's 2400 steps
    student_share: float = 0.56
    bank_share: float = 0.5  # with defects ddpm: half painted, half Perlin (docs/models.md)
    # a second head, trained after the first in as many epochs of its own on Perlin masks of
    # thresholds in [lo, hi]; the map averages the two heads' (standardised); None: one head
    wide_head: tuple[float, float] | None = None
    # the heads also see, at the map's k shallowest scales, each position's teacher feature
    # against its own image's median (seghead.self_distance); 0: DeSTSeg's head
    head_self_reference: int = 0


class Denoised(NamedTuple):
    """Training output: the student's features, and the head's logits in phase two."""

    student: list[Tensor]  # each (B, C_i, h_i, w_i)
    logits: Tensor | None  # (B, 1, h_0, w_0), the training head's; None in phase one


class DeSTDDPM(KDModel, UNetStudent):
    """Teacher on the clean image, denoising student on the defective one, segmentation head
    on their agreement."""

    Options = DeSTOptions
    deep = True  # strides 4-32: stride 32 carries the image score on Magnetic Tile

    @property
    def score_rule(self) -> str:
        rule = head_score_rule(self.opt)
        if self.opt.image_score == "head":
            return rule
        return f"{rule}, plus the max of the student's map, each standardised on good images"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_defects(self.opt)
        ch = self.teacher.channels
        if self.opt.student not in ("destseg", "unet"):
            raise KdadError(f"student must be 'destseg' or 'unet', got {self.opt.student!r}")
        if self.opt.student == "unet":
            self.build_unet(self.teacher, self.opt.unet_width, skips=False, sfm=False)
        else:
            net = build_backbone(self.teacher.backbone, pretrained=False)
            self.encoder = nn.ModuleList(net.split(self.teacher.stages))
            # one more stride-2 stage (DeSTSeg: ResNet18's layer4)
            self.bottleneck = make_stage("basic", ch[-1], ch[-1], 2, 2)
            outs = [ch[-1], *ch[::-1]]  # the bottleneck's scale, then the teacher's, deepest first
            self.decoder = nn.ModuleList(
                make_stage("basic", cin, cout, 2, 1)
                for cin, cout in zip([ch[-1], *outs[:-1]], outs)
            )
        keep = self.opt.map_stages
        if keep is None:  # stride 4 only adds the part's texture noise (docs/models.md)
            pairs = zip(self.teacher.stages, self.teacher.strides)
            keep = [n for n, stride in pairs if stride >= MAP_STRIDE] or self.teacher.stages
        if not keep or set(keep) - set(self.teacher.stages):
            raise KdadError(
                f"map_stages must be some of the model's stages {self.teacher.stages}, got {keep}"
            )
        self.map_scales = [i for i, n in enumerate(self.teacher.stages) if n in keep]
        k, scales = self.opt.head_self_reference, len(self.map_scales)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scales:
            raise KdadError(
                f"head_self_reference must be a count of scales, 0 to {scales}, got {k!r}"
            )
        head_in = [ch[i] for i in self.map_scales]
        self.head = SegHead(head_in, self.opt.head_width, k)
        fresh = [] if self.opt.student == "unet" else [self.bottleneck, self.decoder]
        kaiming_init(*fresh, self.head)
        self.wide_head = None
        if self.opt.wide_head is not None:
            check_thresholds("wide_head", self.opt.wide_head)
            self.wide_head = SegHead(head_in, self.opt.head_width, k)
            kaiming_init(self.wide_head)
            # mean and std of the second head's map's pixels on held-out good images
            self.register_buffer("wide_normal", torch.tensor([0.0, 1.0]))
        for name in ("image_score", "map"):
            if getattr(self.opt, name) not in ("head", "both"):
                value = getattr(self.opt, name)
                raise KdadError(f"{name} must be 'head' or 'both', got {value!r}")
        self.blur = GaussianBlur(STUDENT_SIGMA)
        self.register_buffer("scale_weights", torch.ones(len(self.map_scales)))  # 1 / normal means
        # mean and std of the head's and the student's scores, then of their maps' pixels, on
        # held-out good images
        self.register_buffer("normal", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("pixel_normal", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_load_state_dict_pre_hook(_head_only_if_missing)

    def schedule_steps(self, steps: int) -> int:
        """The student gets the family's ``steps``; the head the rest of the epochs (a second
        head as many again)."""
        share = self.opt.student_share
        heads = 1 if self.wide_head is None else 2
        return round(steps * (share + heads * (1 - share)) / share)

    def phases(self, epochs: int) -> list[Phase]:
        """The student, then the head (``head_phases``); with a second head, the student's share
        is of one head's run and the epochs after it split between the two heads, the second's
        phase ``wide`` the only one that scores."""
        if self.wide_head is None:
            return head_phases(self.opt, epochs)
        share = self.opt.student_share
        first = max(1, round(epochs * share / (2 - share)))
        wide = first + max(1, round((epochs - first) / 2))
        student, head = head_phases(self.opt, epochs)
        return [
            student,
            head._replace(start=first, scoring=False),
            head._replace(name="wide", start=wide),
        ]

    def train_set(self, images: TrainSet, folder: Path, progress: bool) -> SyntheticTrainSet:
        device = self.head[-1].weight.device
        return defect_set(self.opt, images, folder, device, progress, self.opt.wide_head)

    def train(self, mode: bool = True) -> DeSTDDPM:
        super().train(mode)
        if self.phase in ("head", "wide"):  # frozen parts keep their BatchNorm statistics
            idle = self.head if self.phase == "wide" else self.wide_head  # the other head
            for part in [*self.student_parts(), *([idle] if idle is not None else [])]:
                part.train(False)
        return self

    def student_parts(self) -> list[nn.Module]:
        """The student's modules."""
        if self.opt.student == "unet":
            return self.unet_parts()
        return [self.encoder, self.bottleneck, self.decoder]

    def student(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> features at the teacher's scales, shallowest first: STU-Seg's U-Net
        without skips, or DeSTSeg's: the encoder down to one stage past the teacher's deepest,
        then basic blocks at each scale, climbing by bilinear upsampling."""
        if self.opt.student == "unet":
            return self.unet_student(x)
        sizes = []
        for piece in self.encoder:
            x = piece(x)
            sizes.append(x.shape[-2:])  # scale i: (h_i, w_i)
        x = self.decoder[0](self.bottleneck(x))
        out = []
        for stage, size in zip(self.decoder[1:], sizes[::-1]):
            x = stage(F.interpolate(x, size=size, mode="bilinear"))  # (B, C_i, h_i, w_i)
            out.append(x)
        return out[::-1]

    def student_map(self, maps: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The student's map from its per-scale 1 - cos maps (B, h_i, w_i): weighted,
        upsampled to ``size``, summed, smoothed: (B, H, W)."""
        up = [
            w * F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
            for w, m in zip(self.scale_weights, maps)
        ]
        return self.blur(sum(up))

    def student_score(self, maps: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The student's image score: the max of its map per image (B,)."""
        return self.student_map(maps, size).flatten(1).amax(1)

    @property
    def uses_student(self) -> bool:
        """Whether the score or the map adds the student's own map to the head's."""
        return "both" in (self.opt.image_score, self.opt.map)

    def _scored(self, x: Tensor, t: list[Tensor]) -> tuple[Output, Tensor | None, list[Tensor]]:
        """The head's output for ``x``, the second head's map (B, H, W) if the model has one,
        and, when the student's map is used, the per-scale 1 - cos maps of student and teacher
        (else none: the heads alone need none)."""
        t, s = self.mapped(t), self.mapped(self.student(x))
        size = tuple(x.shape[-2:])
        out = head_output(self.head.segment(t, s), size, self.opt.top_share)
        wide = None if self.wide_head is None else head_map(self.wide_head.segment(t, s), size)
        if not self.uses_student:
            return out, wide, []
        return out, wide, [1 - F.cosine_similarity(a, b, dim=1) for a, b in zip(t, s)]

    def mapped(self, feats: list[Tensor]) -> list[Tensor]:
        """The scales of ``map_stages`` among all the teacher's (each (B, C_i, h_i, w_i))."""
        return [feats[i] for i in self.map_scales]

    @torch.no_grad()
    def fit_normal(self, images: Iterable[Tensor]) -> None:
        """When the student's map is used: its scale weights, then the mean and standard
        deviation of both scores, and of the maps' pixels (each head's, the student's), on the
        held-out good ``images``."""
        if not self.uses_student:
            return
        outs, wides, maps, sizes = [], [], [], []
        for x in images:
            out, wide, m = self._scored(x, self.teacher(x))
            outs.append(out)
            wides.append(wide)
            maps.append(m)
            sizes.append(tuple(x.shape[-2:]))
        means = torch.stack(
            [torch.cat([m[i].flatten() for m in maps]).mean() for i in range(len(maps[0]))]
        )
        self.scale_weights.copy_(1 / means.clamp_min(1e-6))
        student = [self.student_map(m, size) for m, size in zip(maps, sizes)]
        scores = [
            torch.cat([o.score for o in outs]),
            torch.cat([m.flatten(1).amax(1) for m in student]),
        ]
        pixels = [
            torch.cat([o.anomaly_map.flatten() for o in outs]),
            torch.cat([m.flatten() for m in student]),
        ]

        def spread(v: Tensor) -> Tensor:  # one value has none: it stays unscaled
            return v.std() if len(v) > 1 else torch.ones(())

        self.normal.copy_(
            torch.stack([f(v) for v in scores for f in (torch.mean, spread)]).clamp_min(1e-6)
        )
        self.pixel_normal.copy_(
            torch.stack([f(v) for v in pixels for f in (torch.mean, spread)]).clamp_min(1e-6)
        )
        if self.wide_head is not None:
            v = torch.cat([w.flatten() for w in wides])
            self.wide_normal.copy_(torch.stack([v.mean(), spread(v)]).clamp_min(1e-6))

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Denoised | Output:
        """(B, 3, H, W) -> train: Denoised; eval: Output."""
        if self.training and self.phase not in ("head", "wide"):
            return Denoised(self.student(x), None)
        t = self.teach(x, teacher)
        if self.training:
            with torch.no_grad():
                s = self.student(x)
            head = self.wide_head if self.phase == "wide" else self.head
            return Denoised(s, head.segment(self.mapped(t), self.mapped(s)))
        out, wide, maps = self._scored(x, t)
        score, amap = out.score, out.anomaly_map
        if self.opt.map == "head" and wide is not None:
            amap = (amap + wide) / 2
        if not self.uses_student:
            return Output(amap, score)
        student = self.student_map(maps, tuple(x.shape[-2:]))  # (B, H, W)
        if self.opt.image_score == "both":
            hm, hs, sm, ss = self.normal
            score = (score - hm) / hs + (student.flatten(1).amax(1) - sm) / ss
        if self.opt.map == "both":
            hm, hs, sm, ss = self.pixel_normal
            amap = (amap - hm) / hs
            if wide is not None:
                wm, ws = self.wide_normal
                amap = (amap + (wide - wm) / ws) / 2
            amap = amap + (student - sm) / ss
        return Output(amap, score)

    def loss(self, batch: dict[str, Tensor], out: Denoised) -> dict[str, Tensor]:
        if out.logits is not None:
            return head_loss(out.logits, batch["mask"])
        t = self.teach(batch["clean"], batch.get("clean_teacher"))  # the clean image's
        parts = {f"cos{i}": pixel_cosine_loss(a, b) for i, (a, b) in enumerate(zip(t, out.student))}
        return {"loss": sum(parts.values()), **parts}


def _head_only_if_missing(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
) -> None:
    """A checkpoint from before the student's share in the score scores by the head alone, as
    it did when saved."""
    state_dict.setdefault(prefix + "scale_weights", torch.ones_like(module.scale_weights))
    state_dict.setdefault(prefix + "normal", HEAD_ONLY.clone())
    state_dict.setdefault(prefix + "pixel_normal", HEAD_ONLY.clone())
