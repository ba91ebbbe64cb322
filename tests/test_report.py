"""`kdad report`: a self-contained HTML page whose figures render in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_mvtec
from PIL import Image

import kdad
from kdad.cli import main
from kdad.errors import KdadError
from kdad.page import THUMB
from kdad.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_mvtec(root / "data", n_train=12, n_good=4, n_bad=4)
    ckpt = kdad.train(
        model="rd",
        data=data,
        epochs=2,
        batch_size=4,
        image_size=32,
        holdout=0.25,
        out=root / "run",
        progress=False,
    )
    kdad.evaluate(ckpt, out=root / "run")
    kdad.load(ckpt).predict_files([data / "test" / "scratch"], root / "pred")
    return root


def _render(page: Path, tmp: Path) -> dict[str, int]:
    """Load the page in headless Chromium; read what its load handler recorded."""
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "Chromium returned no page"
    return {k: int(v) for k, v in re.findall(r'data-(\w+)="(\d+)"', body.group(1))}


def _self_contained(page: Path) -> str:
    text = page.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(re.match(r"data:image/(png|jpeg);base64,", s) for s in srcs)
    return text


def _parts(html: str) -> list[np.ndarray]:
    """The page's embedded JPEGs (the parts), as (H, W, 3) arrays."""
    found = re.findall(r'src="data:image/jpeg;base64,([^"]*)"', html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in found]


def test_labelled_report(run: Path, tmp_path: Path) -> None:
    assert main(["report", str(run / "run")]) == 0
    page = run / "run" / "report.html"
    text = _self_contained(page)
    for part in (
        "image_auroc",
        "aupro",
        "Protocol",
        "ROC",
        "Worst false positives",
        "Worst false negatives",
        "good test images flagged",
    ):
        assert part in text
    parts = _parts(text)
    assert len(parts) == 8 and all(p.shape[1] <= THUMB for p in parts)
    missed = parts[4:]  # the defective images: their true region outlined in magenta
    magenta = [((p[..., 0] > 180) & (p[..., 1] < 90) & (p[..., 2] > 180)).sum() for p in missed]
    assert all(m > 0 for m in magenta)
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    seen = _render(page, tmp_path)
    assert seen["figures"] == 2 + 4 + 4 and seen["rendered"] == seen["figures"]


def test_unlabelled_report(run: Path, tmp_path: Path) -> None:
    page = build_report(run / "pred", tmp_path / "pred.html")
    text = _self_contained(page)
    assert "Highest-scoring images" in text and "judged defective" in text
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    seen = _render(page, tmp_path)
    assert seen["figures"] == 1 + 4 and seen["rendered"] == seen["figures"]


def test_report_of_nothing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KdadError, match=r"no metrics\.json or predictions\.jsonl"):
        build_report(tmp_path)
