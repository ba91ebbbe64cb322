"""The frozen pretrained teacher every kdad method distils from."""

from __future__ import annotations

from torch import Tensor, nn

from kdad.backbones import build_backbone, get_spec
from kdad.errors import KdadError


class Teacher(nn.Module):
    """A frozen pretrained backbone returning the features of chosen stages."""

    def __init__(
        self, backbone: str, stages: list[str] | None, pretrained: bool, weights: str | None
    ) -> None:
        super().__init__()
        self.backbone = backbone
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

    def train(self, mode: bool = True) -> Teacher:
        """The teacher never leaves eval mode: its BatchNorm statistics are ImageNet's."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> the stages' features, shallowest first."""
        return self.net.features(x, self.stages)
