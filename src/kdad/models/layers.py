"""Blocks shared by several models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _symmetric_pad(x: Tensor, r: int, dim: int) -> Tensor:
    """Pad ``r`` pixels each side of ``dim`` by mirroring including the edge (scipy 'reflect')."""
    head = x.narrow(dim, 0, r).flip(dim)
    tail = x.narrow(dim, x.shape[dim] - r, r).flip(dim)
    return torch.cat([head, x, tail], dim)


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of (B, H, W) maps, equal to scipy.ndimage.gaussian_filter
    (truncate 4, mode 'reflect') so the maps match the official code's post-processing."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        self.radius = int(truncate * sigma + 0.5)
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        self.register_buffer("kernel", (k / k.sum()).float(), persistent=False)
        self.sigma = sigma

    def forward(self, m: Tensor) -> Tensor:
        if self.sigma <= 0:
            return m
        x = m.unsqueeze(1)  # (B, 1, H, W)
        k = self.kernel
        r = min(self.radius, x.shape[-1], x.shape[-2])
        if r < self.radius:
            k = k[self.radius - r : self.radius + r + 1]
            k = k / k.sum()
        x = F.conv2d(_symmetric_pad(x, r, 3), k.view(1, 1, 1, -1))
        x = F.conv2d(_symmetric_pad(x, r, 2), k.view(1, 1, -1, 1))
        return x.squeeze(1)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def kaiming_init(module: nn.Module) -> None:
    """He init (fan-out) for convs, BN to identity: torchvision's ResNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cosine_distance_map(t: Tensor, s: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-pixel 1 - cos over channels of (B, C, h, w) features, upsampled to (B, *size)."""
    d = 1 - F.cosine_similarity(t, s, dim=1)  # (B, h, w)
    return F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=True).squeeze(1)


def haar_dwt(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level of the orthonormal 2-D Haar transform, differentiable: (B, C, H, W) ->
    LL, LH, HL, HH, each (B, C, ceil(H/2), ceil(W/2)); odd sizes are edge-padded first.

    LL is the local mean (x2), LH the vertical change (horizontal edges), HL the horizontal
    change (vertical edges), HH the diagonal detail.
    """
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


class ScaleAttention(nn.Module):
    """Selective-kernel attention over n same-shaped inputs: from the global context of their
    sum, per-channel weights for each input that sum to one over the inputs."""

    def __init__(self, channels: int, n: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.heads = nn.Linear(hidden, channels * n)
        self.n = n

    def forward(self, xs: list[Tensor]) -> Tensor:
        """(B, C, h, w) x n -> weights (B, n, C, 1, 1), softmax over n."""
        z = self.squeeze(torch.stack(xs).sum(0).mean((2, 3)))  # (B, hidden)
        w = self.heads(z).view(z.shape[0], self.n, -1)  # (B, n, C)
        return w.softmax(1)[..., None, None]


class GatedFusion(nn.Module):
    """Blend two feature maps with a gate over channels and positions (both dimensions):
    g = sigmoid(channel(z) + spatial(z)), z = [a, b]; out = g a + (1 - g) b. Starts at g = 1/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel = nn.Conv2d(2 * channels, channels, 1)
        self.spatial = nn.Conv2d(2 * channels, 1, 7, padding=3)
        for conv in (self.channel, self.spatial):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        z = torch.cat([a, b], 1)  # (B, 2C, h, w)
        g = torch.sigmoid(self.channel(z.mean((2, 3), keepdim=True)) + self.spatial(z))
        return g * a + (1 - g) * b
