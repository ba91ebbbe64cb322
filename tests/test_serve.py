"""`kdad serve`: the HTTP contract, bad input, a real server under concurrent load, and the web
page driven by a real headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import pytest
from conftest import make_mvtec
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import sync_playwright

import kdad
from kdad.export import export_onnx
from kdad.serve import create_app


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A calibrated RD run on generated data and its ONNX export."""
    root = tmp_path_factory.mktemp("serve")
    data = make_mvtec(root / "data", n_train=16, n_good=4, n_bad=4)
    kdad.train(
        model="rd",
        data=data,
        epochs=10,  # 30 steps: past the point where the outcome hangs on float rounding
        batch_size=4,
        image_size=64,
        holdout=0.25,
        out=root / "run",
        progress=False,
    )
    export_onnx(root / "run", root / "export")
    return root / "data", root / "export"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_health_schema_and_page(trained: tuple[Path, Path]) -> None:
    data, export = trained
    client = TestClient(create_app(export))
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["runtime"] == "onnxruntime" and h["model"] == "rd"
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert "kdad inspection" in client.get("/").text
    bad = sorted((data / "test" / "scratch").glob("*.png"))[0]
    r = client.post("/predict", files={"file": (bad.name, bad.read_bytes(), "image/png")})
    assert r.status_code == 200
    a = r.json()
    assert a["decision"] == "defect" and a["score"] >= 0.5 and a["instances"]
    overlay = Image.open(io.BytesIO(base64.b64decode(a["overlay_png"])))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["mask_png"]))))
    assert overlay.size == (a["width"], a["height"]) and mask.any()
    x0, y0, x1, y1 = a["instances"][0]["box"]
    truth = np.asarray(Image.open(data / "ground_truth" / "scratch" / f"{bad.stem}_mask.png"))
    assert truth[y0:y1, x0:x1].any()  # the region found is the defect
    good = sorted((data / "test" / "good").glob("*.png"))[0]
    r = client.post(
        "/predict?images=false", files={"file": ("g.png", good.read_bytes(), "image/png")}
    )
    assert r.status_code == 200 and "overlay_png" not in r.json()


def test_bad_input_is_a_clear_4xx_and_the_service_goes_on(trained: tuple[Path, Path]) -> None:
    data, export = trained
    client = TestClient(create_app(export, max_bytes=200_000, max_pixels=1_000_000))
    good = (sorted((data / "test" / "good").glob("*.png"))[0]).read_bytes()
    cases = {
        "not an image": (("notes.png", b"hello, not a picture", "image/png"), 400),
        "truncated": (("cut.png", good[: len(good) // 2], "image/png"), 400),
        "bomb": (("big.png", _png(np.zeros((2000, 1000, 3), np.uint8)), "image/png"), 413),
        "too many bytes": (("huge.png", good + b"\0" * 200_000, "image/png"), 413),
        "wrong type": (("a.txt", good, "text/plain"), 415),
    }
    for what, (upload, status) in cases.items():
        r = client.post("/predict", files={"file": upload})
        assert r.status_code == status, what
        assert upload[0] in r.json()["detail"], what  # the message names the file
    assert client.post("/predict").status_code == 422  # no file at all
    r = client.post("/predict", files={"file": ("ok.png", good, "image/png")})
    assert r.status_code == 200  # still serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained: tuple[Path, Path]):
    """The real `kdad serve` on loopback, two worker processes."""
    port = _free_port()
    cmd = [sys.executable, "-m", "kdad", "serve", "--model", str(trained[1])]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("kdad serve did not come up")
    yield url, proc.pid
    proc.terminate()
    proc.wait(10)


def _post(url: str, name: str, body: bytes) -> int:
    files = {"file": (name, body, "image/png")}
    return httpx2.post(url + "/predict?images=false", files=files, timeout=60).status_code


def test_real_server_answers_eight_concurrent_clients(trained, server) -> None:
    data, _ = trained
    files = sorted((data / "test").rglob("*.png"))
    bodies = [(f.name, f.read_bytes()) for f in files] * 5  # 40 requests
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda nb: _post(server[0], *nb), bodies))
    assert codes == [200] * len(bodies)


def test_replicas_answer_alike(trained, server) -> None:
    """Stateless: the 2-worker server (requests in parallel, so both workers answer) and a
    separate in-process replica, fed the images in the opposite order, give identical answers,
    overlay and mask PNGs included."""
    data, export = trained
    url, pid = server
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.is_file():
        assert len(children.read_text().split()) >= 2  # uvicorn's worker processes
    files = sorted((data / "test").rglob("*.png"))

    def ask(f: Path) -> dict:
        r = httpx2.post(url + "/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
        assert r.status_code == 200
        return r.json()

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(ask, files * 2))
    replica = TestClient(create_app(export, threads=max(1, (os.cpu_count() or 1) // 2)))
    local = [
        replica.post("/predict", files={"file": (f.name, f.read_bytes(), "image/png")}).json()
        for f in reversed(files)
    ][::-1]
    assert served == local * 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_web_page_in_headless_chromium(trained, server) -> None:
    data, _ = trained
    bad = sorted((data / "test" / "scratch").glob("*.png"))[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server[0] + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('rd')")
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.body.dataset.done === '1'", timeout=30_000)
        assert page.text_content(".verdict") == "DEFECT"
        width = page.evaluate("document.querySelector('img.overlay').naturalWidth")
        assert width == Image.open(bad).width  # the overlay rendered, at the image's size
        browser.close()
