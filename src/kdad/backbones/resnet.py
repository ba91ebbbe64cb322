"""ResNet18/34/50 and WideResNet50-2 in plain torch, with torchvision's parameter names.

The residual blocks take ``transposed=True`` to upsample with a 2x2 transposed convolution
instead of downsampling: reverse distillation's decoder student is built from the same blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdad.errors import KdadError


def _conv3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def _resample(cin: int, cout: int, stride: int, transposed: bool) -> nn.Module:
    """The spatial conv of a block: strided 3x3, or 2x2 transposed conv when upsampling."""
    if transposed and stride == 2:
        return nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)
    return _conv3(cin, cout, stride)


def _shortcut(cin: int, cout: int, stride: int, transposed: bool) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    if transposed and stride == 2:
        conv: nn.Module = nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)
    else:
        conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs and a residual (ResNet18/34)."""

    def __init__(
        self, cin: int, cout: int, stride: int = 1, transposed: bool = False, out_relu: bool = True
    ) -> None:
        super().__init__()
        self.out_relu = out_relu  # False: a signed output (a student matching signed features)
        self.conv1 = _resample(cin, cout, stride, transposed)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride, transposed)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = y + (x if self.downsample is None else self.downsample(x))
        return self.relu(y) if self.out_relu else y


class Bottleneck(nn.Module):
    """1x1 reduce to ``width``, 3x3 (or 2x2 transposed), 1x1 expand, residual (ResNet50+)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        transposed: bool = False,
        width: int = 0,
        out_relu: bool = True,
    ) -> None:
        super().__init__()
        self.out_relu = out_relu  # False: a signed output (a student matching signed features)
        width = width or cout // 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _resample(width, width, stride, transposed)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride, transposed)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        y = y + (x if self.downsample is None else self.downsample(x))
        return self.relu(y) if self.out_relu else y


def make_stage(
    block: str,
    cin: int,
    cout: int,
    n: int,
    stride: int,
    transposed: bool = False,
    width_factor: float = 0.25,
    out_relu: bool = True,
) -> nn.Sequential:
    """``n`` residual blocks; the first changes resolution by ``stride``, channels to ``cout``;
    the last ends in a ReLU unless ``out_relu`` is False."""
    layers: list[nn.Module] = []
    for i in range(n):
        c, s = (cin, stride) if i == 0 else (cout, 1)
        last = out_relu or i < n - 1
        if block == "basic":
            layers.append(BasicBlock(c, cout, s, transposed, last))
        else:
            layers.append(Bottleneck(c, cout, s, transposed, int(cout * width_factor), last))
    return nn.Sequential(*layers)


# name -> (block, blocks per stage, bottleneck width as a fraction of the block's output)
RESNET_PARAMS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1.0),
    "resnet34": ("basic", (3, 4, 6, 3), 1.0),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 0.25),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 0.5),
}


class ResNet(nn.Module):
    """torchvision-compatible ResNet whose ``layer1``..``layer4`` can be read as features."""

    def __init__(self, name: str = "resnet18", num_classes: int = 1000) -> None:
        super().__init__()
        block, counts, width_factor = RESNET_PARAMS[name]
        expansion = 1 if block == "basic" else 4
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        self.stage_channels: list[int] = []
        for i, n in enumerate(counts):
            cout = 64 * 2**i * expansion
            stage = make_stage(block, cin, cout, n, 1 if i == 0 else 2, width_factor=width_factor)
            self.add_module(f"layer{i + 1}", stage)
            self.stage_channels.append(cout)
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    @property
    def stages(self) -> dict[str, tuple[int, int]]:
        """Feature stage name -> (channels, stride)."""
        return {f"layer{i + 1}": (c, 4 * 2**i) for i, c in enumerate(self.stage_channels)}

    def features(self, x: Tensor, names: list[str]) -> list[Tensor]:
        """Outputs of the named layers, running only as deep as the deepest one needs."""
        out: dict[str, Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if f"layer{i + 1}" in names:
                out[f"layer{i + 1}"] = x
                if len(out) == len(names):
                    break
        return [out[n] for n in names]

    def split(self, names: list[str]) -> list[nn.Module]:
        """The network cut after each named layer (shallow to deep): running the pieces one after
        another gives those layers' outputs; the layers after the last one are left out."""
        ends = [int(n.removeprefix("layer")) for n in names]
        if ends != sorted(set(ends)):
            raise KdadError(f"split needs distinct stages from shallow to deep, got {names}")
        pieces: list[nn.Module] = []
        start = 1
        for end in ends:
            layers = [getattr(self, f"layer{i}") for i in range(start, end + 1)]
            if not pieces:
                layers = [self.conv1, self.bn1, self.relu, self.maxpool, *layers]
            pieces.append(nn.Sequential(*layers))
            start = end + 1
        return pieces

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
