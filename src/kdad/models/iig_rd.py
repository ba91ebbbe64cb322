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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.models.base import Output
from kdad.models.distill import decode, rd_loss
from kdad.models.rd import RD


class Guided(NamedTuple):
    """Training output: features, and the one-class embedding before and after guidance."""

    teacher: list[Tensor]  # each (B, C_i, h_i, w_i)
    student: list[Tensor]  # the same shapes
    embedding: Tensor  # (B, D, h, w)
    guided: Tensor  # (B, D, h, w)


class IIGRD(RD):
    """RD whose decoder reads a prototype-guided one-class embedding."""

    @dataclass
    class Options(RD.Options):
        prototypes: int = 64  # learnable prototypes; 0 = none (plain RD with the terms off)
        temperature: float = 0.1  # of the softmax over prototype similarities
        intra: float = 0.1  # weight of the intra-sample term; 0 = off
        inter: float = 0.1  # weight of the inter-sample term; 0 = off

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k, c_emb = self.opt.prototypes, 2 * self.teacher.channels[-1]
        self.prototypes = nn.Parameter(torch.randn(k, c_emb)) if k > 0 else None

    def guide(self, e: Tensor) -> Tensor:
        """(B, D, h, w) embedding -> the same re-expressed as a mix of prototypes."""
        b, d, h, w = e.shape
        flat = e.flatten(2).transpose(1, 2)  # (B, hw, D)
        sim = F.normalize(flat, dim=-1) @ F.normalize(self.prototypes, dim=-1).T  # (B, hw, K)
        mixed = sim.div(self.opt.temperature).softmax(-1) @ self.prototypes  # (B, hw, D)
        return mixed.transpose(1, 2).reshape(b, d, h, w)

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Guided | Output:
        """(B, 3, H, W) -> train: Guided; eval: Output."""
        t = self.teach(x, teacher)
        e = self.embed(t)  # (B, D, h, w)
        g = self.guide(e) if self.prototypes is not None else e
        s = decode(self.decoder, g)
        if self.training:
            return Guided(t, s, e, g)
        return self.output(t, s, x)

    def loss(self, batch: dict[str, Tensor], out: Guided) -> dict[str, Tensor]:
        e, g = out.embedding, out.guided
        parts = {"distill": sum(rd_loss(out.teacher, out.student))}
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
