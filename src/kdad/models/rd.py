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
from typing import Any

import torch
from torch import Tensor, nn

from kdad.backbones.resnet import make_stage
from kdad.errors import KdadError
from kdad.models.base import Output
from kdad.models.distill import Distiller, MapOptions, Pair, decode, rd_loss
from kdad.models.layers import conv_bn_relu, kaiming_init, pixel_cosine_loss

# backbone -> (block, OCBE blocks, decoder blocks deepest first, inner width / output width),
# as in the official de_resnet*/BN_layer builders; other backbones use _DEFAULT_RECIPE.
_RECIPES = {
    "resnet18": ("basic", 2, (2, 2, 2), 1.0),
    "resnet34": ("basic", 3, (3, 4, 6), 1.0),
    "resnet50": ("bottleneck", 3, (3, 4, 6), 0.25),
    "wide_resnet50_2": ("bottleneck", 3, (3, 4, 6), 0.5),
}
_DEFAULT_RECIPE = ("bottleneck", 3, (3, 4, 6), 1.0)


class RD(Distiller):
    """Teacher encoder -> OCBE -> decoder student; anomaly = 1 - cos(teacher, student)."""

    @dataclass
    class Options(MapOptions):
        ocbe_blocks: int = 0  # residual blocks in the OCBE; 0 = the backbone's recipe
        decoder_blocks: tuple[int, ...] = ()  # per decoder stage, deepest first; () = recipe
        loss: str = "flat"  # flat: official, 1 - cos of whole flattened maps; pixel: per position
        student_relu: bool = True  # decoder stages end in ReLU (official); False: signed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.opt
        ch, strides = self.teacher.channels, self.teacher.strides
        if any(b != 2 * a for a, b in itertools.pairwise(strides)):
            raise KdadError(
                f"RD needs stages whose strides double one to the next, got {strides} "
                f"from {self.teacher.stages}"
            )
        block, n_ocbe, dec_blocks, wf = _RECIPES.get(self.teacher.backbone, _DEFAULT_RECIPE)
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
        kaiming_init(self.fuse, self.ocbe, self.decoder)
        if opt.loss not in ("flat", "pixel"):
            raise KdadError(f"loss must be flat or pixel, got {opt.loss!r}")
        self.pixel_loss = opt.loss == "pixel"

    def embed(self, feats: list[Tensor]) -> Tensor:
        """The one-class embedding of the teacher's features: (B, 2 C_last, h/2, w/2)."""
        fused = [f(x) for f, x in zip(self.fuse, feats)]  # each (B, C_last, h, w)
        return self.ocbe(torch.cat([*fused, feats[-1]], 1))

    def student(self, feats: list[Tensor]) -> list[Tensor]:
        """Decoder features, shallowest first, matching the teacher's list."""
        return decode(self.decoder, self.embed(feats))

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Pair | Output:
        """(B, 3, H, W) -> train: teacher and student features; eval: Output."""
        t = self.teach(x, teacher)
        s = self.student(t)
        if self.training:
            return Pair(t, s)
        return self.output(t, s, x)

    def loss(self, batch: dict[str, Tensor], out: Pair) -> dict[str, Tensor]:
        if self.pixel_loss:
            losses = [pixel_cosine_loss(a, b) for a, b in zip(out.teacher, out.student)]
        else:
            losses = rd_loss(out.teacher, out.student)
        parts = {f"cos{i}": v for i, v in enumerate(losses)}
        return {"loss": sum(parts.values()), **parts}
