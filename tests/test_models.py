"""The model contract, checked for every registered model."""

from __future__ import annotations

import pytest
import torch

from kdad.backbones import build_backbone
from kdad.models import MODELS, Output, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_teacher_stays_pretrained_and_out_of_the_optimiser(name: str) -> None:
    model = build_model(name, "efficientnet_lite0")
    ref = build_backbone("efficientnet_lite0").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.teacher.net.state_dict().items())
    trained = {id(p) for g in model.param_groups() for p in g["params"]}
    assert not trained & {id(p) for p in model.teacher.parameters()}
    assert trained  # a student to train
    model.train()
    assert not model.teacher.net.training  # ImageNet BatchNorm statistics are kept
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert isinstance(out, Output) and out.anomaly_map.shape == (1, 64, 64)
