"""The model contract: a new method is one class registered by name, and the code that trains,
scores and serves models knows no method."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_mvtec
from torch import Tensor, nn

import kdad
from kdad.export import OnnxRunner, TorchRunner, export_onnx
from kdad.models import MODELS, KDModel, Output
from kdad.models.distill import Pair, scale_maps
from kdad.models.layers import pixel_cosine_loss

SRC = Path(kdad.__file__).parent
# Words that are model options and also the contract's or the field's own: ``loss`` is the
# contract's loss method and its total; ``width`` an image's width; ``map`` the anomaly map
# every model outputs (and the exported graph's output).
GENERIC = {"loss", "width", "map"}


class Toy(KDModel):
    """A seventh method written here alone: per teacher scale, a conv of the image pooled
    to that scale must reproduce the teacher's features."""

    @dataclass
    class Options:
        kernel: int = 1  # side of the conv kernel: a toy option

    score_rule = "max of the anomaly map"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.opt.kernel
        self.heads = nn.ModuleList(nn.Conv2d(3, c, k) for c in self.teacher.channels)

    def forward(self, x: Tensor, teacher: list[Tensor] | None = None) -> Pair | Output:
        """(B, 3, H, W) -> train: teacher and student features; eval: Output."""
        t = self.teach(x, teacher)
        s = [head(F.adaptive_avg_pool2d(x, f.shape[-2:])) for head, f in zip(self.heads, t)]
        if self.training:
            return Pair(t, s)
        amap = sum(scale_maps(t, s, tuple(x.shape[-2:])))  # (B, H, W)
        return Output(amap, amap.flatten(1).amax(1))

    def loss(self, batch: dict[str, Tensor], out: Pair) -> dict[str, Tensor]:
        parts = {f"cos{i}": pixel_cosine_loss(a, b) for i, (a, b) in enumerate(zip(*out))}
        return {"loss": sum(parts.values()), **parts}


def test_a_seventh_model_trains_tests_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "toy", Toy)
    data = make_mvtec(tmp_path / "data", n_train=10)
    ckpt = kdad.train(
        data=data, model="toy", epochs=2, batch_size=4,
        image_size=32, out=tmp_path / "run", progress=False,
    )  # fmt: skip
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["config"]["model"]["name"] == "toy" and state["epoch"] == 2
    assert any(k.startswith("heads.") for k in state["model"])
    res = kdad.evaluate(ckpt)
    assert res["protocol"]["model"] == "toy"
    assert res["protocol"]["score"] == "max of the anomaly map"
    assert 0 <= res["metrics"]["image_auroc"] <= 1 and len(res["per_image"]) == 8
    export_onnx(ckpt, tmp_path / "onnx")
    image = np.asarray(np.random.default_rng(0).integers(0, 256, (1, 40, 48, 3)), dtype=np.uint8)
    got = OnnxRunner(tmp_path / "onnx").run(image)
    ref = TorchRunner(ckpt).run(image)
    assert got["map"].shape == ref["map"].shape == (1, 32, 32)
    assert np.allclose(got["raw_score"], ref["raw_score"], rtol=1e-4, atol=1e-5)


def test_training_scoring_and_serving_code_names_no_method_and_no_option() -> None:
    files = [*sorted((SRC / "engine").glob("*.py"))]
    files += [SRC / "detector.py", SRC / "export.py", SRC / "serve.py"]
    names = set(MODELS) | {cls.__name__ for cls in MODELS.values()}
    options = {f.name for cls in MODELS.values() for f in dataclasses.fields(cls.Options)}
    found = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.name}:{i}: {n}" for n in names if re.search(rf"\b{n}\b", line)]
            found += [
                f"{path.name}:{i}: option {o}"
                for o in options - GENERIC
                if re.search(rf"\.{o}\b|[\"']{o}[\"']", line)
            ]
    assert options & GENERIC == GENERIC  # the exceptions are real option names
    assert not found, "\n".join(found)
