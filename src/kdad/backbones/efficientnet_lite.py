"""EfficientNet-Lite0/1/2 in plain torch, loading the lukemelas-format ImageNet weights.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, a fixed 32-channel
stem and 1280-channel head, and the first and last stages never repeated. Convolutions use
TensorFlow "SAME" padding (asymmetric for stride 2) and BatchNorm eps 1e-3, as in training.

For CPU speed (a frozen teacher runs 3x faster, docs/benchmarks.md) the network runs
channels-last, never copies its input to pad it (``Conv2dSame.same``), applies ReLU6 in place,
and with BatchNorm in eval mode folds it into the convolution's weights at each call (the state
dict keeps its keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.errors import KdadError

# Base (Lite0) stages: kernel, stride, expand ratio, in channels, out channels, repeats.
_BASE_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
# name -> (width multiplier, depth multiplier, ImageNet resolution)
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
_BN = {"eps": 1e-3, "momentum": 0.01}


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    """Scale channels by ``width``, rounded to a multiple of 8 without dropping below 90%."""
    c *= width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (extra pixel right)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.same(x, self.weight, self.bias)

    def same(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This convolution of ``x`` with ``weight`` and ``bias`` in place of its own. Where
        "SAME" pads one pixel more after than before, the kernel gets a zero tap in front and
        the convolution pads evenly: the same sums, without copying ``x`` into a padded one.
        An exported graph, made for any input size, keeps the pads a separate op."""
        pads = []  # F.pad's order: left, right, top, bottom
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if torch.compiler.is_exporting():
            return F.conv2d(F.pad(x, pads), weight, bias, self.stride, 0, 1, self.groups)
        front = [pads[3] - pads[2], pads[1] - pads[0]]  # (h, w): 1 where one more pad is after
        if any(front):
            weight = F.pad(weight, [front[1], 0, front[0], 0])  # (C_out, C_in / groups, k', k')
        weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, bias, self.stride, (pads[3], pads[1]), 1, self.groups)


def conv_bn(conv: Conv2dSame, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(conv(x))``; with ``bn`` in eval mode, one convolution whose weights carry the
    BatchNorm's affine map (folded at each call: cheap beside the convolution)."""
    if bn.training:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
    weight = conv.weight * scale[:, None, None, None]  # (C_out, C_in / groups, k, k)
    return conv.same(x, weight, bn.bias - bn.running_mean * scale)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(conv_bn(self._expand_conv, self._bn0, y), inplace=True)
        y = F.relu6(conv_bn(self._depthwise_conv, self._bn1, y), inplace=True)
        y = conv_bn(self._project_conv, self._bn2, y)
        return x + y if self.residual else y


def stem(conv: Conv2dSame, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """The stem, (B, 3, H, W) -> (B, 32, H/2, W/2), channels-last from here on."""
    x = x.contiguous(memory_format=torch.channels_last)
    return F.relu6(conv_bn(conv, bn, x), inplace=True)


class FirstPiece(nn.Sequential):
    """``split``'s first piece: the stem's convolution, BatchNorm and ReLU6, then blocks, the
    stem run as the whole network runs it (``stem``)."""

    def forward(self, x: Tensor) -> Tensor:
        conv, bn, _, *blocks = self
        x = stem(conv, bn, x)
        for block in blocks:
            x = block(x)
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier whose stages ``stage1``..``stage7`` can be read as features."""

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000) -> None:
        super().__init__()
        width, depth, _ = LITE_PARAMS[name]
        self._conv_stem = Conv2dSame(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of the last block of each stage
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []
        stride_total = 2
        for i, (k, s, e, cin, cout, n) in enumerate(_BASE_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < i < len(_BASE_STAGES) - 1:
                n = math.ceil(n * depth)
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
            stride_total *= s
            self.stage_ends.append(len(blocks) - 1)
            self.stage_channels.append(cout)
            self.stage_strides.append(stride_total)
        self._blocks = nn.ModuleList(blocks)
        cout = self.stage_channels[-1]
        self._conv_head = Conv2dSame(cout, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)

    @property
    def stages(self) -> dict[str, tuple[int, int]]:
        """Feature stage name -> (channels, stride)."""
        return {
            f"stage{i + 1}": (c, s)
            for i, (c, s) in enumerate(zip(self.stage_channels, self.stage_strides))
        }

    def features(self, x: Tensor, names: list[str]) -> list[Tensor]:
        """Outputs of the named stages, running only as deep as the deepest one needs."""
        ends = {self.stage_ends[int(n.removeprefix("stage")) - 1]: n for n in names}
        out: dict[str, Tensor] = {}
        x = stem(self._conv_stem, self._bn0, x)
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in ends:
                out[ends[i]] = x
                if len(out) == len(ends):
                    break
        return [out[n] for n in names]

    def split(self, names: list[str]) -> list[nn.Module]:
        """The network cut after each named stage (shallow to deep): running the pieces one after
        another gives those stages' outputs; the layers after the last one are left out."""
        ends = [self.stage_ends[int(n.removeprefix("stage")) - 1] for n in names]
        if ends != sorted(set(ends)):
            raise KdadError(f"split needs distinct stages from shallow to deep, got {names}")
        pieces: list[nn.Module] = []
        start = 0
        for end in ends:
            blocks = list(self._blocks[start : end + 1])
            if not pieces:
                pieces.append(FirstPiece(self._conv_stem, self._bn0, nn.ReLU6(), *blocks))
            else:
                pieces.append(nn.Sequential(*blocks))
            start = end + 1
        return pieces

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000)."""
        x = stem(self._conv_stem, self._bn0, x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(conv_bn(self._conv_head, self._bn1, x), inplace=True)
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
