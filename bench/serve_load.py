"""Benchmark: `kdad serve` under load on loopback: requests/second and latency percentiles of
POST /predict with concurrent clients, a bounded number of requests, and no error allowed.

The model is RD trained one epoch on the data and exported to ONNX (weights do not change the
cost); requests send the data's test images as PNG uploads and ask for the overlay and mask.

    python bench/serve_load.py --clients 8 --requests 400 --workers 1 2
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import kdad
from kdad.data.io import read_image
from kdad.data.layouts import find_samples
from kdad.export import export_onnx


def post(url: str, name: str, body: bytes) -> tuple[int, float]:
    """One multipart upload: (status, seconds)."""
    tic = time.perf_counter()
    r = httpx2.post(url + "/predict", files={"file": (name, body, "image/png")}, timeout=120)
    return r.status_code, time.perf_counter() - tic


def load(url: str, bodies: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    jobs = [bodies[i % len(bodies)] for i in range(requests)]
    post(url, *jobs[0])  # warm-up
    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda nb: post(url, *nb), jobs))
    wall = time.perf_counter() - tic
    lat = np.array([s for _, s in results])
    return {
        "requests": requests,
        "clients": clients,
        "errors": sum(code != 200 for code, _ in results),
        "seconds": wall,
        "requests_per_second": requests / wall,
        "latency_ms": {f"p{q}": 1000 * float(np.quantile(lat, q / 100)) for q in (50, 90, 99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--out", default="bench/results/serve_load.json")
    args = ap.parse_args()

    bodies = []
    for s in find_samples(args.data, "test")[:32]:
        buf = io.BytesIO()
        Image.fromarray((read_image(s.path) * 255).round().astype(np.uint8)).save(buf, "PNG")
        bodies.append((s.path.name, buf.getvalue()))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "rd"
        kdad.train(data=args.data, epochs=1, image_size=args.image_size, out=run, progress=False)
        export_onnx(run, run / "onnx")
        for workers in args.workers:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "kdad", "serve", "--model", str(run / "onnx")]
            cmd += ["--port", str(port), "--workers", str(workers)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(600):
                    try:
                        urllib.request.urlopen(url + "/health", timeout=1)
                        break
                    except OSError:
                        time.sleep(0.1)
                rows[f"workers{workers}"] = load(url, bodies, args.clients, args.requests)
                print(workers, rows[f"workers{workers}"])
            finally:
                proc.terminate()
                proc.wait(30)
    write_result(args.out, {"benchmark": "serve_load", "settings": vars(args), "runs": rows})


if __name__ == "__main__":
    main()
