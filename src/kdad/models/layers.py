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


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 conv (same padding at any dilation), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def kaiming_init(*modules: nn.Module) -> None:
    """He init (fan-out) for convs, BN to identity: torchvision's ResNet initialisation, of
    each module in turn."""
    for m in (m for module in modules for m in module.modules()):
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


class SelectiveFusion(nn.Module):
    """Selective-kernel fusion of n same-shaped inputs (Li et al., CVPR 2019, over feature
    levels instead of kernels): from the global context of their sum, per-channel weights for
    each input that sum to one over the inputs; the output is the weighted sum."""

    def __init__(self, channels: int, n: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.heads = nn.Linear(hidden, channels * n)
        self.n = n

    def weights(self, xs: list[Tensor]) -> Tensor:
        """(B, C, h, w) x n -> weights (B, n, C, 1, 1), softmax over n."""
        z = self.squeeze(torch.stack(xs).sum(0).mean((2, 3)))  # (B, hidden)
        w = self.heads(z).view(z.shape[0], self.n, -1)  # (B, n, C)
        return w.softmax(1)[..., None, None]

    def forward(self, xs: list[Tensor]) -> Tensor:
        """(B, C, h, w) x n -> their weighted sum (B, C, h, w)."""
        w = self.weights(xs)
        return sum(w[:, i] * x for i, x in enumerate(xs))


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


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attentive block (Ristea et al., CVPR 2022).

    A masked convolution predicts each position from four k x k corner kernels at distance
    ``dilation`` + k from it, never from the (2 dilation + 1)^2 square around it; ReLU;
    squeeze-and-excitation channel attention (reduction 8). ``loss`` is the block's own
    reconstruction error, the mean squared difference between its output and its input.
    """

    def __init__(self, channels: int, kernel: int = 1, dilation: int = 1, reduction: int = 8):
        super().__init__()
        self.pad = kernel + dilation
        self.border = kernel + 2 * dilation + 1
        self.corners = nn.ModuleList(nn.Conv2d(channels, channels, kernel) for _ in range(4))
        hidden = max(channels // reduction, 1)
        self.attention = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def predict(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> each position predicted from its masked context, (B, C, H, W)."""
        p, b = self.pad, self.border
        xp = F.pad(x, (p, p, p, p))
        views = (
            xp[..., :-b, :-b],  # top-left corner
            xp[..., b:, :-b],  # bottom-left
            xp[..., :-b, b:],  # top-right
            xp[..., b:, b:],  # bottom-right
        )
        return F.relu(sum(conv(v) for conv, v in zip(self.corners, views)))

    def forward(self, x: Tensor) -> Tensor:
        z = self.predict(x)  # (B, C, H, W)
        gate = torch.sigmoid(self.attention(z.mean((2, 3))))  # (B, C)
        return z * gate[..., None, None]

    @staticmethod
    def loss(out: Tensor, x: Tensor) -> Tensor:
        """The self-supervised reconstruction error of the block."""
        return F.mse_loss(out, x)


class SimAM(nn.Module):
    """Parameter-free attention (Yang et al., ICML 2021): each activation t is weighted by
    sigmoid(1 / e*), with e* = 4 (var + lam) / ((t - mean)^2 + 2 var + 2 lam) its minimal
    energy, mean and var over its channel's n = H W positions (var divided by n - 1)."""

    def __init__(self, lam: float = 1e-4) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-2] * x.shape[-1] - 1
        d = (x - x.mean((2, 3), keepdim=True)) ** 2  # (B, C, H, W)
        var = d.sum((2, 3), keepdim=True) / max(n, 1)
        return x * torch.sigmoid(d / (4 * (var + self.lam)) + 0.5)


def pixel_cosine_loss(t: Tensor, s: Tensor) -> Tensor:
    """Mean over positions of 1 - cos over channels of (B, C, h, w) features (STPM's per-pixel
    loss on L2-normalised features, 0.5 ||t/|t| - s/|s| ||^2, written as a cosine)."""
    return (1 - F.cosine_similarity(t, s, dim=1)).mean()


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as DeSTSeg's: dilated 3x3 convs and image pooling side by
    side, concatenated and fused by a 3x3 conv; each conv-BN-ReLU, but the pooling branch's
    1x1 conv has a bias instead of BatchNorm, which a batch of one image cannot normalise."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn_relu(cin, cout, dilation=r) for r in rates)
        self.pool = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu((len(rates) + 1) * cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([pooled, *(b(x) for b in self.branches)], 1))
