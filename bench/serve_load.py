"""Benchmark: `kdad serve` under load on loopback: requests/second and latency percentiles of
POST /predict with concurrent clients, a bounded number of requests, and no error allowed; and
the model's share of each answer's machine time: the CPU seconds onnxruntime takes for one
image (measured here, one image at a time as the service runs it) over the CPU seconds the
server's processes spend per answer under the load.

The model is RD trained one epoch on the data and exported to ONNX (weights do not change the
cost); requests send the data's test images as PNG uploads, with ``--query`` (default none: the
service's default answer; ``images=true`` asks for the overlay and mask, as every answer had
before issue 32). The server is whatever ``python -m kdad`` imports: run the script with
PYTHONPATH naming another checkout's src to measure that one.

    python bench/serve_load.py --clients 8 --requests 400 --workers 1 2
"""

from __future__ import annotations

import argparse
import io
import os
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
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import kdad
from kdad.data.io import read_image
from kdad.data.layouts import find_samples
from kdad.engine.pool import cores_per
from kdad.export import export_onnx


def post(url: str, name: str, body: bytes) -> tuple[int, float]:
    """One multipart upload: (status, seconds)."""
    tic = time.perf_counter()
    r = httpx2.post(url, files={"file": (name, body, "image/png")}, timeout=120)
    return r.status_code, time.perf_counter() - tic


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(stat[11]) + int(stat[12])) / tick  # utime, stime
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.is_file() else []
    return total + sum(cpu_seconds(int(k)) for k in kids)


def model_cpu_seconds(onnx: Path, images: list[np.ndarray], threads: int) -> float:
    """onnxruntime's CPU seconds per image, one image a call (as the service calls it)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
    batches = [im[None] for im in images]
    session.run(None, {"images": batches[0]})
    tic = time.process_time()
    for b in batches * 3:
        session.run(None, {"images": b})
    return (time.process_time() - tic) / (3 * len(batches))


def load(
    url: str, bodies: list[tuple[str, bytes]], clients: int, requests: int, server: int
) -> dict:
    jobs = [bodies[i % len(bodies)] for i in range(requests)]
    post(url, *jobs[0])  # warm-up
    cpu = cpu_seconds(server)
    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda nb: post(url, *nb), jobs))
    wall = time.perf_counter() - tic
    cpu = cpu_seconds(server) - cpu
    lat = np.array([s for _, s in results])
    return {
        "server_cpu_ms_per_answer": 1000 * cpu / requests,
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
    ap.add_argument("--model", default="rd")
    ap.add_argument("--query", default="", help="query string of every request, e.g. images=true")
    ap.add_argument("--out", default="bench/results/serve_load.json")
    args = ap.parse_args()

    bodies, images = [], []
    for s in find_samples(args.data, "test")[:32]:
        buf = io.BytesIO()
        images.append((read_image(s.path) * 255).round().astype(np.uint8))
        Image.fromarray(images[-1]).save(buf, "PNG")
        bodies.append((s.path.name, buf.getvalue()))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "rd"
        kdad.train(
            data=args.data,
            model=args.model,
            epochs=1,
            image_size=args.image_size,
            out=run,
            progress=False,
        )
        export_onnx(run, run / "onnx")
        for workers in args.workers:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [sys.executable, "-m", "kdad", "serve", "--model", str(run / "onnx")]
            cmd += ["--port", str(port), "--workers", str(workers)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            predict = url + "/predict" + (f"?{args.query}" if args.query else "")
            try:
                for _ in range(600):
                    try:
                        urllib.request.urlopen(url + "/health", timeout=1)
                        break
                    except OSError:
                        time.sleep(0.1)
                row = load(predict, bodies, args.clients, args.requests, proc.pid)
                model = model_cpu_seconds(run / "onnx" / "model.onnx", images, cores_per(workers))
                row["model_cpu_ms_per_image"] = 1000 * model
                row["model_share"] = row["model_cpu_ms_per_image"] / row["server_cpu_ms_per_answer"]
                rows[f"workers{workers}"] = row
                print(workers, row)
            finally:
                proc.terminate()
                proc.wait(30)
    write_result(args.out, {"benchmark": "serve_load", "settings": vars(args), "runs": rows})


if __name__ == "__main__":
    main()
