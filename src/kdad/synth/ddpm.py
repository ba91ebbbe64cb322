"""A small denoising diffusion probabilistic model (Ho et al., NeurIPS 2020) that learns the
good images of one dataset, and uses it to paint defects: a Perlin-masked region is perturbed
with constant-variance Gaussian noise, diffused to an intermediate step and denoised back with
the rest of the image held to the original (DDIM steps, RePaint-style re-imposition outside the
mask), so the defect is blended into the part's own texture and lighting.

The network is a plain, fully convolutional U-Net (ResNet blocks with GroupNorm, SiLU and a
sinusoidal timestep embedding; no attention, to stay fast on a CPU); epsilon prediction, linear
betas 1e-4..0.02 over T = 1000 steps, as in the paper. Two departures, both measured
(docs/models.md): it learns crops of the images at the detector's own input size, so it paints
at the scale the detector sees and can paint a whole image of any size; and it learns only the
steps painting uses (below ``max_depth`` T). Images are in [-1, 1].
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.config import DDPMOptions


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) integer steps -> (B, dim) sinusoidal embedding (the Transformer's)."""
    half = dim // 2
    freq = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    arg = t.float()[:, None] * freq[None]  # (B, half)
    return torch.cat([arg.sin(), arg.cos()], 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added between, residual shortcut."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[..., None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """(B, C, S, S) noisy image and (B,) steps -> (B, C, S, S) predicted noise."""

    def __init__(self, opt: DDPMOptions) -> None:
        super().__init__()
        w = [opt.width * 2**i for i in range(opt.levels)]
        self.tdim = 4 * opt.width
        self.time = nn.Sequential(
            nn.Linear(opt.width, self.tdim), nn.SiLU(), nn.Linear(self.tdim, self.tdim)
        )
        self.stem = nn.Conv2d(opt.channels, w[0], 3, padding=1)
        self.down = nn.ModuleList(
            ResBlock(w[max(i - 1, 0)], w[i], self.tdim) for i in range(len(w))
        )
        self.mid = ResBlock(w[-1], w[-1], self.tdim)
        self.up = nn.ModuleList(
            ResBlock(2 * w[i], w[max(i - 1, 0)], self.tdim) for i in range(len(w) - 1, -1, -1)
        )
        self.out = nn.Sequential(
            nn.GroupNorm(8, w[0]), nn.SiLU(), nn.Conv2d(w[0], opt.channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.width = opt.width

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time(timestep_embedding(t, self.width))  # (B, tdim)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h, temb)
            skips.append(h)  # level i: (B, w_i, S / 2^i, S / 2^i)
        h = self.mid(h, temb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], 1), temb)
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)


class DDPM(nn.Module):
    """The U-Net with its noise schedule: ``loss`` to train, ``paint`` to make defects."""

    def __init__(self, opt: DDPMOptions | None = None) -> None:
        super().__init__()
        self.opt = opt or DDPMOptions()
        if self.opt.crop % self.multiple:
            raise ValueError(f"crop must be a multiple of {self.multiple}")
        if not 0 < self.opt.max_depth <= 1:
            raise ValueError(f"max_depth must be in (0, 1], got {self.opt.max_depth}")
        self.net = UNet(self.opt)
        betas = torch.linspace(1e-4, 0.02, self.opt.timesteps, dtype=torch.float64)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the U-Net halves them levels - 1 times)."""
        return 2 ** (self.opt.levels - 1)

    @property
    def deepest(self) -> int:
        """The last step learnt: training draws steps below ``max_depth`` T."""
        return max(1, round(self.opt.max_depth * self.opt.timesteps)) - 1

    def noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) for per-sample steps t: (B, C, S, S)."""
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, x0: Tensor) -> Tensor:
        """Epsilon-prediction MSE at steps drawn uniformly up to ``deepest`` (Ho et al.'s simple
        loss, on the part of the schedule that painting uses)."""
        t = torch.randint(0, self.deepest + 1, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(self.net(self.noised(x0, t, noise), t), noise)

    @torch.no_grad()
    def paint(
        self,
        x0: Tensor,
        mask: Tensor,
        strength: float,
        sigma: float,
        grain: float,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Repaint the masked region of (B, C, H, W) images in [-1, 1] as a defect.

        Inside ``mask`` (B, 1, H, W) the image gets Gaussian noise of constant std ``sigma``,
        white or, with ``grain`` > 0, correlated over about ``grain`` pixels (a blotch, not a
        speck), is diffused to step ``strength`` T and denoised in ``steps`` DDIM steps;
        outside, each step re-imposes the original diffused to the same level, and the result
        keeps the original exactly. Sides are padded by reflection to the U-Net's multiple.
        """
        dev = x0.device
        h, w = x0.shape[-2:]
        pad = (0, -w % self.multiple, 0, -h % self.multiple)
        x0, mask = F.pad(x0, pad, mode="reflect"), F.pad(mask, pad)

        def randn() -> Tensor:
            return torch.randn(x0.shape, generator=generator, device=dev)

        t0 = int(strength * self.opt.timesteps)
        if not 1 <= t0 <= self.deepest:
            top = (self.deepest + 1) / self.opt.timesteps
            raise ValueError(f"strength must be in [0.001, {top:g}] (this DDPM's max_depth)")
        ts = torch.linspace(t0, 0, min(steps, t0) + 1, device=dev).round().long().tolist()
        noise = unit_field(randn(), grain)
        perturbed = torch.where(mask > 0, (x0 + sigma * noise).clamp(-1, 1), x0)
        x = self.noised(perturbed, torch.full((len(x0),), t0, device=dev), randn())
        for t, t_prev in itertools.pairwise(ts):
            ab, ab_prev = self.alpha_bar[t], self.alpha_bar[t_prev]
            eps = self.net(x, torch.full((len(x0),), t, device=dev))
            x0_hat = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            x = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps
            known = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * randn()
            x = torch.where(mask > 0, x, known)
        return torch.where(mask > 0, x.clamp(-1, 1), x0)[..., :h, :w]


def gaussian_kernel(sigma: float) -> Tensor:
    """A normalised 1-D Gaussian of std ``sigma`` pixels, 3 sigma each side: (K,)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    return k / k.sum()


def blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflected borders."""
    k = gaussian_kernel(sigma).to(x)
    r, c = len(k) // 2, x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect" if min(x.shape[-2:]) > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def unit_field(noise: Tensor, grain: float) -> Tensor:
    """White Gaussian ``noise`` (B, C, H, W), or with ``grain`` > 0 blurred over that many
    pixels and rescaled to unit std per image and channel: Gaussian, of constant variance."""
    if grain <= 0:
        return noise
    field = blur(noise, grain)
    return field / field.std((2, 3), keepdim=True).clamp_min(1e-8)
