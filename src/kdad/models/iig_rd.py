"""IIG-RD: reverse distillation guided by learnable prototypes, intra- and inter-sample (Guan,
Zhou, Yang et al., "Unsupervised steel pipe weld defect detection based on internal and external
guided reverse distillation", Transactions of the China Welding Institution 2026, 47(6):20-30,
doi 10.12073/j.hjxb.20251231004). Only the abstract is public; docs/models.md says which
sentence each part comes from and what was chosen where it is silent.

- "An intra- and inter-guided mechanism introduced as a learnable prototype": a bank of K
  learnable prototypes in the one-class embedding space; every position of the embedding is
  re-expressed as an attention-weighted mix of prototypes (cosine similarity, temperature) and
  the decoder reads that guided embedding. Normal patterns are what the prototypes can express,
  so a defect's embedding is pulled towards normal and the decoder's output departs from the
  teacher there.
- "Structured constraints on the feature distribution at two levels": an intra-sample term
  (each position agrees with its prototype re-expression: 1 - cos, averaged over positions) and
  an inter-sample term (each sample's mean embedding agrees with the batch's, and prototypes
  stay distinct: mean absolute cosine between different prototypes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.models.rd import RD, decode, rd_loss, smoothed_output


class IIGRD(RD):
    """RD whose decoder reads a prototype-guided one-class embedding."""

    @dataclass
    class Options(RD.Options):
        prototypes: int = 64  # learnable prototypes; 0 = none (plain RD with the terms off)
        temperature: float = 0.1  # of the softmax over prototype similarities
        intra: float = 0.1  # weight of the intra-sample term; 0 = off
        inter: float = 0.1  # weight of the inter-sample term; 0 = off

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        stages: list[str] | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        options: IIGRD.Options | None = None,
    ) -> None:
        opt = options or IIGRD.Options()
        super().__init__(backbone, stages, pretrained, weights, opt)
        self.opt = opt
        c_emb = 2 * self.teacher.channels[-1]
        self.prototypes = (
            nn.Parameter(torch.randn(opt.prototypes, c_emb)) if opt.prototypes > 0 else None
        )

    def guide(self, e: Tensor) -> Tensor:
        """(B, D, h, w) embedding -> the same re-expressed as a mix of prototypes."""
        b, d, h, w = e.shape
        flat = e.flatten(2).transpose(1, 2)  # (B, hw, D)
        sim = F.normalize(flat, dim=-1) @ F.normalize(self.prototypes, dim=-1).T  # (B, hw, K)
        mixed = sim.div(self.opt.temperature).softmax(-1) @ self.prototypes  # (B, hw, D)
        return mixed.transpose(1, 2).reshape(b, d, h, w)

    def embed(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(one-class embedding, what the decoder reads: its prototype-guided version)."""
        fused = [f(x) for f, x in zip(self.fuse, feats)]  # each (B, C_last, h, w)
        e = self.ocbe(torch.cat([*fused, feats[-1]], 1))  # (B, 2 C_last, h/2, w/2)
        return e, (self.guide(e) if self.prototypes is not None else e)

    def forward(self, x: Tensor):
        """(B, 3, H, W) -> train: (teacher, student, embedding, guided); eval: Output."""
        with torch.no_grad():
            t = self.teacher(x)
        e, g = self.embed(t)
        s = decode(self.decoder, g)
        if self.training:
            return t, s, e, g
        return smoothed_output(self.blur, t, s, tuple(x.shape[-2:]))

    def loss(self, batch: dict[str, Tensor], out) -> dict[str, Tensor]:
        t, s, e, g = out
        parts = {"distill": sum(rd_loss(t, s))}
        total = parts["distill"]
        if self.prototypes is not None and self.opt.intra > 0:
            parts["intra"] = (1 - F.cosine_similarity(e, g, dim=1)).mean()
            total = total + self.opt.intra * parts["intra"]
        if self.prototypes is not None and self.opt.inter > 0:
            means = e.mean((2, 3))  # (B, D) each sample's embedding
            spread = (1 - F.cosine_similarity(means, means.mean(0, keepdim=True), dim=1)).mean()
            p = F.normalize(self.prototypes, dim=1)
            k = len(p)
            overlap = ((p @ p.T).abs().sum() - k) / max(k * (k - 1), 1)
            parts["inter"] = spread + overlap
            total = total + self.opt.inter * parts["inter"]
        return {"loss": total, **parts}
