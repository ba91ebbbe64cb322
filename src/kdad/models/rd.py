"""Reverse distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022), following the official code (hq-deng/RD4AD).

A frozen teacher encoder gives features at three scales; the one-class bottleneck embedding
(OCBE) fuses them (strided conv-BN-ReLU down to the deepest scale, concatenation) and compresses
them with one residual stage of stride 2; a decoder student mirroring the encoder upsamples with
transposed convolutions and must reproduce the teacher's features at each scale. Where it cannot,
the image is anomalous.

Deviations (also in docs/models.md): widths follow the chosen backbone's stage channels, so any
registered backbone works; for non-ResNet teachers (EfficientNet-Lite) the student uses
bottleneck blocks whose inner width equals their output width, because Lite's stages are narrow
(24-112 channels) and a 4x squeeze would leave 6-channel layers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kdad.backbones import build_backbone, get_spec
from kdad.backbones.resnet import make_stage
from kdad.errors import KdadError
from kdad.models.base import KDModel, Output
from kdad.models.layers import (
    GaussianBlur,
    conv_bn_relu,
    cosine_distance_map,
    kaiming_init,
    pixel_cosine_loss,
)

if TYPE_CHECKING:
    from kdad.engine.teacher_cache import TeacherCache

# backbone -> (block, OCBE blocks, decoder blocks deepest first, inner width / output width),
# as in the official de_resnet*/BN_layer builders; other backbones use _DEFAULT_RECIPE.
_RECIPES = {
    "resnet18": ("basic", 2, (2, 2, 2), 1.0),
    "resnet34": ("basic", 3, (3, 4, 6), 1.0),
    "resnet50": ("bottleneck", 3, (3, 4, 6), 0.25),
    "wide_resnet50_2": ("bottleneck", 3, (3, 4, 6), 0.5),
}
_DEFAULT_RECIPE = ("bottleneck", 3, (3, 4, 6), 1.0)
MAX_RULE = "max of the anomaly map (Gaussian-smoothed, sigma 4 by default)"


class Teacher(nn.Module):
    """A frozen pretrained backbone returning the features of chosen stages."""

    def __init__(
        self, backbone: str, stages: list[str] | None, pretrained: bool, weights: str | None
    ) -> None:
        super().__init__()
        self.net = build_backbone(backbone, pretrained, weights)
        self.stages = list(stages or get_spec(backbone).default_stages)
        known = self.net.stages
        bad = [s for s in self.stages if s not in known]
        if bad:
            raise KdadError(f"{backbone} has no stage {bad[0]!r}; stages: {', '.join(known)}")
        self.channels = [known[s][0] for s in self.stages]
        self.strides = [known[s][1] for s in self.stages]
        self.net.requires_grad_(False)
        self.net.eval()
        self.cache: TeacherCache | None = None  # set by the training loop (engine/teacher_cache)

    def train(self, mode: bool = True) -> Teacher:
        """The teacher never leaves eval mode: its BatchNorm statistics are ImageNet's."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> the stages' features, shallowest first; from the cache when the
        training loop has given this batch's features."""
        if self.cache is not None and (feats := self.cache.take()) is not None:
            return feats
        return self.net.features(x, self.stages)


class RD(KDModel):
    """Teacher encoder -> OCBE -> decoder student; anomaly = 1 - cos(teacher, student)."""

    score_rule = MAX_RULE

    @dataclass
    class Options:
        sigma: float = 4.0  # Gaussian smoothing of the anomaly map, pixels
        ocbe_blocks: int = 0  # residual blocks in the OCBE; 0 = the backbone's recipe
        decoder_blocks: tuple[int, ...] = ()  # per decoder stage, deepest first; () = recipe
        loss: str = "flat"  # flat: official, 1 - cos of whole flattened maps; pixel: per position
        student_relu: bool = True  # decoder stages end in ReLU (official); False: signed

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        stages: list[str] | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        options: RD.Options | None = None,
    ) -> None:
        super().__init__()
        opt = options or RD.Options()
        self.teacher = Teacher(backbone, stages, pretrained, weights)
        ch, strides = self.teacher.channels, self.teacher.strides
        if any(b != 2 * a for a, b in itertools.pairwise(strides)):
            raise KdadError(
                f"RD needs stages whose strides double one to the next, got {strides} "
                f"from {self.teacher.stages}"
            )
        block, n_ocbe, dec_blocks, wf = _RECIPES.get(backbone, _DEFAULT_RECIPE)
        n_ocbe = opt.ocbe_blocks or n_ocbe
        dec_blocks = tuple(opt.decoder_blocks) or dec_blocks
        if len(dec_blocks) < len(ch):
            raise KdadError(f"decoder_blocks needs {len(ch)} entries, got {list(dec_blocks)}")
        # Multi-scale feature fusion: each shallower feature goes down to the deepest scale.
        self.fuse = nn.ModuleList(
            nn.Sequential(*[conv_bn_relu(ch[j], ch[j + 1], 2) for j in range(i, len(ch) - 1)])
            for i in range(len(ch) - 1)
        )
        c_last, c_emb = ch[-1], 2 * ch[-1]
        self.ocbe = make_stage(block, len(ch) * c_last, c_emb, n_ocbe, 2, width_factor=wf)
        cins = [c_emb, *ch[::-1][:-1]]
        self.decoder = nn.ModuleList(
            make_stage(
                block, cin, cout, n, 2, transposed=True, width_factor=wf, out_relu=opt.student_relu
            )
            for cin, cout, n in zip(cins, ch[::-1], dec_blocks)
        )
        kaiming_init(self.fuse)
        kaiming_init(self.ocbe)
        kaiming_init(self.decoder)
        if opt.loss not in ("flat", "pixel"):
            raise KdadError(f"loss must be flat or pixel, got {opt.loss!r}")
        self.pixel_loss = opt.loss == "pixel"
        self.blur = GaussianBlur(opt.sigma)

    def student(self, feats: list[Tensor]) -> list[Tensor]:
        """Decoder features, shallowest first, matching the teacher's list."""
        fused = [f(x) for f, x in zip(self.fuse, feats)]  # each (B, C_last, h, w)
        x = self.ocbe(torch.cat([*fused, feats[-1]], 1))  # (B, 2 C_last, h/2, w/2)
        return decode(self.decoder, x)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]] | Output:
        """(B, 3, H, W) -> train: (teacher, student) features; eval: Output."""
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(t)
        if self.training:
            return t, s
        return smoothed_output(self.blur, t, s, tuple(x.shape[-2:]))

    def loss(
        self, batch: dict[str, Tensor], out: tuple[list[Tensor], list[Tensor]]
    ) -> dict[str, Tensor]:
        t, s = out
        if self.pixel_loss:
            losses = [pixel_cosine_loss(a, b) for a, b in zip(t, s)]
        else:
            losses = rd_loss(t, s)
        parts = {f"cos{i}": v for i, v in enumerate(losses)}
        return {"loss": sum(parts.values()), **parts}


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


def smoothed_output(
    blur: GaussianBlur, teacher: list[Tensor], student: list[Tensor], size: tuple[int, int]
) -> Output:
    """The family's eval output: RD's map, Gaussian-smoothed (B, H, W), and its max as score."""
    amap = blur(anomaly_map(teacher, student, size))
    return Output(amap, amap.flatten(1).amax(1))
