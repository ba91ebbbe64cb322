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
from kdad.data.io import read_image
from kdad.engine.runtime import KEEP_DAYS
from kdad.export import cached_export, export_onnx
from kdad.serve import create_app, decode_upload


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
    upload = {"file": (bad.name, bad.read_bytes(), "image/png")}
    r = client.post("/predict?images=true&outlines=true&heatmap=true", files=upload)
    assert r.status_code == 200
    a = r.json()
    assert a["decision"] == "defect" and a["score"] >= 0.5 and a["instances"]
    assert a["unclipped_score"] >= a["score"]  # equal below 1, past it where the clip was
    model_ms, total_ms = (float(t.split("dur=")[1]) for t in r.headers["server-timing"].split(","))
    assert 0 < model_ms <= total_ms
    heat = Image.open(io.BytesIO(base64.b64decode(a["heatmap_png"])))
    assert heat.size == (64, 64)  # the model's map, not the image's size
    outlines = [np.array(o) for o in a["outlines"]]  # each (n, 2): x, y in the image's pixels
    assert outlines and all((o[0] == o[-1]).all() for o in outlines)  # closed
    assert all(o.min() >= 0 and (o <= [a["width"], a["height"]]).all() for o in outlines)
    overlay = Image.open(io.BytesIO(base64.b64decode(a["overlay_png"])))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["mask_png"]))))
    assert overlay.size == (a["width"], a["height"]) and mask.any()
    x0, y0, x1, y1 = a["instances"][0]["box"]
    truth = np.asarray(Image.open(data / "ground_truth" / "scratch" / f"{bad.stem}_mask.png"))
    assert truth[y0:y1, x0:x1].any()  # the region found is the defect
    near = [(o >= [x0 - 2, y0 - 2]).all(1) & (o <= [x1 + 2, y1 + 2]).all(1) for o in outlines]
    assert max(n.mean() for n in near) > 0.9  # an outline goes around the largest instance
    verdict = client.post("/predict", files=upload).json()  # the default: the verdict alone
    assert not {"overlay_png", "mask_png", "heatmap_png", "outlines"} & set(verdict)
    assert verdict["instances"] == a["instances"] and verdict["score"] == a["score"]
    good = sorted((data / "test" / "good").glob("*.png"))[0]
    r = client.post(
        "/predict?outlines=true", files={"file": ("g.png", good.read_bytes(), "image/png")}
    )
    assert r.status_code == 200 and r.json()["decision"] == "ok" and r.json()["outlines"] == []


def test_a_checkpoint_is_served_by_its_export_in_the_graph_cache(trained) -> None:
    data, export = trained
    served = TestClient(create_app(export.parent / "run"))
    assert served.get("/health").json()["runtime"] == "onnxruntime"
    ref = TestClient(create_app(export))
    for f in sorted((data / "test").rglob("*.png")):
        upload = {"file": (f.name, f.read_bytes(), "image/png")}
        a, b = (
            served.post("/predict", files=upload).json(),
            ref.post("/predict", files=upload).json(),
        )
        assert a["decision"] == b["decision"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_cached_exports_are_reused_and_the_unused_ones_go(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDAD_CACHE", str(tmp_path))
    run = trained[1].parent / "run"
    exports = tmp_path / "exports"
    for name, days in (("stale", KEEP_DAYS + 1), ("recent", KEEP_DAYS - 1)):
        (exports / name).mkdir(parents=True)
        (exports / name / "model.onnx").write_bytes(b"")
        past = time.time() - days * 86400
        os.utime(exports / name, (past, past))
    folder = cached_export(run)
    assert folder.parent == exports and (folder / "model.onnx").is_file()
    assert not (exports / "stale").exists() and (exports / "recent").exists()
    past, inode = time.time() - 86400, (folder / "model.onnx").stat().st_ino
    os.utime(folder, (past, past))
    assert cached_export(run) == folder
    assert (folder / "model.onnx").stat().st_ino == inode  # not written again
    assert folder.stat().st_mtime > past + 3600  # but marked used


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


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("what", "arr", "fmt"),
    [
        ("12-bit data in a 16-bit PNG", np.array([[0, 1000], [2000, 4095]], np.uint16), "PNG"),
        ("float TIFF", np.array([[0.0, 0.25], [0.5, 2.0]], np.float32), "TIFF"),
        ("RGBA PNG", np.arange(16, dtype=np.uint8).reshape(2, 2, 4) * 16, "PNG"),
    ],
)
def test_an_upload_decodes_as_the_same_file_read_for_predict(
    tmp_path: Path, what: str, arr: np.ndarray, fmt: str
) -> None:
    data = _encode(arr, fmt)
    (tmp_path / "f").write_bytes(data)
    want = (read_image(tmp_path / "f") * 255).round().astype(np.uint8)  # (H, W, 3)
    got = decode_upload(data, "f", 10_000)
    assert got.dtype == np.uint8 and got.shape == (2, 2, 3), what
    assert np.array_equal(got, want), what
    if arr.dtype == np.uint16:  # by the type's range, not stretched to the image's own maximum
        assert got.max() == round(4095 / 65535 * 255)


def test_a_12_bit_part_scores_as_its_8_bit_equal(trained: tuple[Path, Path]) -> None:
    """A camera's 12 bits in a 16-bit file are dark by 16-bit's range: the service scores
    them as the 8-bit image of the same levels (as training and `kdad predict` read them)."""
    data, export = trained
    client = TestClient(create_app(export))
    bad = sorted((data / "test" / "scratch").glob("*.png"))[0]
    gray = np.asarray(Image.open(bad).convert("L"), np.float64)  # (H, W) 0-255
    deep = np.round(gray / 255 * 4095).astype(np.uint16)  # 12-bit levels
    flat = np.round(deep / 65535 * 255).astype(np.uint8)  # the same levels in 8 bits
    a, b = (
        client.post("/predict", files={"file": (n, _encode(x, "PNG"), "image/png")}).json()
        for n, x in (("deep.png", deep), ("flat.png", flat))
    )
    assert a["raw_score"] == b["raw_score"] and a["decision"] == b["decision"]


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
    return httpx2.post(url + "/predict", files=files, timeout=60).status_code


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
        files = {"file": (f.name, f.read_bytes(), "image/png")}
        r = httpx2.post(url + "/predict?images=true&outlines=true", files=files)
        assert r.status_code == 200
        return r.json()

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(ask, files * 2))
    replica = TestClient(create_app(export, threads=max(1, (os.cpu_count() or 1) // 2)))
    local = [
        replica.post(
            "/predict?images=true&outlines=true",
            files={"file": (f.name, f.read_bytes(), "image/png")},
        ).json()
        for f in reversed(files)
    ][::-1]
    assert served == local * 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_web_page_in_headless_chromium(trained, server, tmp_path: Path) -> None:
    """3 defective and 2 good parts given at once as a folder, two names in both subfolders:
    results in the order given, folders shown where names repeat, the service's verdicts and
    unclipped scores, its outlines drawn, the heatmap on its toggle, counts, and the CSV."""
    data, _ = trained
    batch = tmp_path / "batch"
    for folder, i in [("scratch", 0), ("scratch", 1), ("scratch", 2), ("good", 0), ("good", 1)]:
        (batch / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "test" / folder / f"{i:03d}.png", batch / folder)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(server[0] + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('rd')")
        page.set_input_files("#folder", str(batch))
        given = page.evaluate("[...document.getElementById('folder').files]"
                              ".map(f => f.webkitRelativePath)")  # fmt: skip
        assert sorted(given) == sorted(
            f"batch/{f.parent.name}/{f.name}" for f in batch.rglob("*.png")
        )
        page.wait_for_function("document.body.dataset.done === '5'", timeout=60_000)
        labels = page.eval_on_selector_all(".result small", "els => els.map(e => e.textContent)")
        names = [Path(g).name for g in given]
        shown = [g if names.count(Path(g).name) > 1 else Path(g).name for g in given]
        assert labels == [f"{i}. {s}" for i, s in enumerate(shown, 1)]
        assert "batch/good/000.png" in shown and "002.png" in shown
        answers = []
        for g in given:
            body = (tmp_path / g).read_bytes()
            files = {"file": (Path(g).name, body, "image/png")}
            answers.append(httpx2.post(server[0] + "/predict?outlines=true", files=files).json())
        verdicts = page.eval_on_selector_all(
            ".result .verdict", "els => els.map(e => e.textContent)"
        )
        assert verdicts == [a["decision"].upper() for a in answers]
        texts = page.eval_on_selector_all(".result p", "els => els.map(e => e.textContent)")
        assert all(f"score {a['unclipped_score']:.2f}" in t for a, t in zip(answers, texts))
        drawn = page.eval_on_selector_all(".result", "els => els.map(e => "
                                          "e.querySelectorAll('polygon').length)")  # fmt: skip
        assert drawn == [len(a["outlines"]) for a in answers] and sum(drawn) > 0
        n_bad = sum(a["decision"] == "defect" for a in answers)
        counts = page.text_content("#counts")
        assert f"OK {5 - n_bad}" in counts and f"DEFECT {n_bad}" in counts
        assert not page.is_visible(".result img.heat")
        page.check("#heat")
        assert page.is_visible(".result img.heat")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        with page.expect_download() as download:
            page.click("#csv")
        lines = Path(download.value.path()).read_text().splitlines()
        browser.close()
    assert lines[0] == "n,path,decision,score,raw_score,regions,error"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[1].strip('"') for r in rows] == given
    assert [r[2] for r in rows] == [a["decision"] for a in answers]
