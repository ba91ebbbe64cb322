"""IIG-RD: prototype guidance and the intra- and inter-sample terms, each switchable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdad.models import build_model


def test_guided_embedding_is_made_of_prototypes() -> None:
    model = build_model(
        "iig_rd", "resnet18", pretrained=False, options={"prototypes": 4, "temperature": 1e-4}
    )
    p = model.prototypes.detach()
    e = p[torch.tensor([2, 0, 3, 1])].T.reshape(1, -1, 2, 2) * 5  # scaled copies of prototypes
    g = model.guide(e)
    # At a tiny temperature each position becomes its most similar prototype exactly.
    assert torch.allclose(g, p[torch.tensor([2, 0, 3, 1])].T.reshape(1, -1, 2, 2), atol=1e-5)


@pytest.mark.parametrize(
    ("options", "terms"),
    [
        ({}, {"distill", "intra", "inter"}),
        ({"intra": 0}, {"distill", "inter"}),
        ({"inter": 0}, {"distill", "intra"}),
        ({"prototypes": 0}, {"distill"}),
    ],
)
def test_switches(options: dict, terms: set[str]) -> None:
    model = build_model("iig_rd", "resnet18", pretrained=False, options=options)
    assert (model.prototypes is None) == (options.get("prototypes") == 0)
    parts = model.loss({}, model.train()(torch.randn(2, 3, 64, 64)))
    assert set(parts) - {"loss"} == terms
    parts["loss"].backward()
    if model.prototypes is not None:
        assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).anomaly_map.shape == (1, 64, 64)


def test_inter_term_prefers_distinct_prototypes() -> None:
    model = build_model("iig_rd", "resnet18", pretrained=False, options={"prototypes": 3})
    out = model.train()(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        model.prototypes.copy_(torch.eye(3, model.prototypes.shape[1]))
    distinct = model.loss({}, out)["inter"]
    with torch.no_grad():
        model.prototypes.copy_(F.normalize(torch.ones_like(model.prototypes), dim=1))
    assert model.loss({}, out)["inter"] > distinct + 0.9  # identical prototypes cost ~1 more
