"""Every model scores the same on every runtime: PyTorch eager, or its ONNX graph in
onnxruntime (the default on the CPU), kept in a cache keyed by what made it."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec

import kdad
from kdad.engine.runtime import (
    KEEP_DAYS,
    TOLERANCE,
    EagerScorer,
    GraphScorer,
    check_graph,
    make_scorer,
)
from kdad.errors import KdadError
from kdad.models import MODELS, build_model


@pytest.mark.parametrize(
    ("name", "options"), [(n, None) for n in MODELS] + [("dest_ddpm", {"wide_head": [0.1, 0.6]})]
)
def test_every_model_answers_in_onnxruntime_what_it_answers_in_pytorch(
    name: str, options: dict | None
) -> None:
    torch.manual_seed(0)
    model = build_model(name, "efficientnet_lite0", pretrained=False, options=options).eval()
    graph = make_scorer(model, (64, 32), "onnxruntime")
    assert isinstance(graph, GraphScorer) and graph.runtime == "onnxruntime"
    x = torch.randn(3, 3, 64, 32)  # a batch size the graph was not written with
    ref, got = EagerScorer(model)(x), graph(x)
    assert got.anomaly_map.shape == ref.anomaly_map.shape == (3, 64, 32)
    scale = float(ref.anomaly_map.abs().max())
    assert float((got.anomaly_map - ref.anomaly_map).abs().max()) <= TOLERANCE * max(scale, 1)
    assert float((got.score - ref.score).abs().max()) <= TOLERANCE * max(scale, 1)


def test_a_graph_is_reused_until_the_weights_change(graph_cache: Path) -> None:
    graphs = graph_cache / "graphs"
    stale, recent = graphs / "stale.onnx", graphs / "recent.onnx"
    killed = graphs / ".stale.onnx.0123abcd.tmp"  # the temporary file of a killed writer
    graphs.mkdir(exist_ok=True)
    for path, days in ((stale, KEEP_DAYS + 1), (killed, KEEP_DAYS + 1), (recent, KEEP_DAYS - 1)):
        path.write_bytes(b"")
        past = time.time() - days * 86400
        os.utime(path, (past, past))
    model = build_model("rd", "efficientnet_lite0", pretrained=False).eval()
    first = make_scorer(model, (32, 32), "auto")
    assert not stale.exists() and not killed.exists()  # unused files go when a graph is written
    assert recent.exists()
    assert isinstance(first, GraphScorer)  # auto on the CPU
    past, inode = time.time() - 86400, first.path.stat().st_ino
    os.utime(first.path, (past, past))
    again = make_scorer(model, (32, 32))
    assert again.path == first.path and again.path.stat().st_ino == inode  # not written again
    assert again.path.stat().st_mtime > past + 3600  # but marked used
    assert first.path.parent == graph_cache / "graphs"
    with torch.no_grad():
        model.param_groups()[0]["params"][0].add_(1.0)  # a weight of the student
    changed = make_scorer(model, (32, 32))
    assert changed.path != first.path
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(changed(x).score, first(x).score)
    assert make_scorer(model, (32, 32), "pytorch").runtime == "pytorch"


def _rd(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("rd", "efficientnet_lite0", pretrained=False).eval()


def test_a_model_of_a_known_architecture_gets_its_graph_from_the_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDAD_CACHE", str(tmp_path))
    first = make_scorer(_rd(0), (32, 32), "onnxruntime")  # exported, its template kept
    (template,) = (tmp_path / "graphs").glob("*.template.onnx")
    other = _rd(1)  # other weights, and another fitted buffer
    other.scale_weights.copy_(torch.tensor([0.5, 1.0, 2.0]))

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", no_export)
        filled = make_scorer(other, (32, 32), "onnxruntime")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert filled.path != first.path
    check_graph(other, filled, x)  # raises unless maps and scores are PyTorch's, within TOLERANCE
    assert not torch.allclose(filled(x).score, first(x).score)

    template.write_bytes(b"not a graph")  # a template that cannot be used: exported afresh
    third = _rd(2)
    check_graph(third, make_scorer(third, (32, 32), "onnxruntime"), x)
    assert template.stat().st_size > 1000 and not list(tmp_path.rglob("*.tmp"))


def test_a_runtime_not_there_or_unknown_is_a_clear_error() -> None:
    model = build_model("rd", "efficientnet_lite0", pretrained=False).eval()
    with pytest.raises(KdadError, match="runtime must be one of"):
        make_scorer(model, (32, 32), "tensorrt")
    try:
        import openvino  # noqa: F401
    except ImportError:
        with pytest.raises(KdadError, match="OpenVINO is not installed"):
            make_scorer(model, (32, 32), "openvino")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_and_test_give_pytorchs_answers_on_the_default_runtime(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "data", n_train=10)
    ckpt = kdad.train(
        data=data, model="rd", epochs=2, batch_size=4, image_size=32,
        out=tmp_path / "run", progress=False,
    )  # fmt: skip
    images = sorted((data / "test").rglob("*.png"))
    fast = kdad.predict(ckpt, images, tmp_path / "fast", batch_size=3, progress=False)[0]
    slow = kdad.predict(ckpt, images, tmp_path / "slow", progress=False, runtime="pytorch")[0]
    a, b = _rows(fast), _rows(slow)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == len(images)
    scores = np.array([[float(r["score"]) for r in rows] for rows in (a, b)])
    assert np.allclose(scores[0], scores[1], rtol=TOLERANCE, atol=TOLERANCE * abs(scores).max())
    assert [r["decision"] for r in a] == [r["decision"] for r in b]
    heat = [np.asarray(kdad.load(ckpt, runtime=r).predict(images[:2])[1].anomaly_map)
            for r in ("auto", "pytorch")]  # fmt: skip
    assert np.abs(heat[0] - heat[1]).max() <= TOLERANCE * max(1, np.abs(heat[1]).max())
    res = {r: kdad.evaluate(ckpt, runtime=r) for r in ("auto", "pytorch")}
    assert res["auto"]["runtime"] == "onnxruntime" and res["pytorch"]["runtime"] == "pytorch"
    for key in ("image_auroc", "pixel_auroc", "pixel_ap"):
        assert res["auto"]["metrics"][key] == pytest.approx(
            res["pytorch"]["metrics"][key], abs=1e-3
        )
