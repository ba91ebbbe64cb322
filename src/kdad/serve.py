"""``kdad serve``: an HTTP service for the line, and its web page.

``POST /predict`` takes one image upload and answers the verdict: the calibrated score (also
unclipped, so that a part far over the threshold reads so) and decision, and the defect
instances. What costs more comes only when asked for: ``outlines`` (the found regions'
polygons), ``heatmap`` (a PNG at the model's resolution), ``images`` (the heatmap overlay and
the defect mask as PNGs at the image's). The ``Server-Timing`` header gives the model's share of
the answer. ``GET /health`` says what is loaded; ``GET /`` is a page where a person drops images
and sees the verdicts; FastAPI serves the OpenAPI schema at ``/openapi.json`` (and ``/docs``).
The service keeps no state between requests, so replicas behind any load balancer answer alike.

Bad input is a 4xx with a JSON ``detail``: 415 for a content type that is not an image, 413 for
an upload over ``max_bytes`` or an image over ``max_pixels`` (decompression bombs), 400 for
bytes that are not a readable image (unknown format, truncated).
"""

from __future__ import annotations

import base64
import io
import os
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Response, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from kdad.config import ServeConfig
from kdad.data.io import pixels, to_rgb8
from kdad.engine.calibrate import unclipped
from kdad.engine.pool import cores_per
from kdad.errors import KdadError
from kdad.export import load_runner
from kdad.outputs import (
    PNG_LEVEL,
    defect_mask,
    find_instances,
    heat_png,
    heatmap_overlay,
    region_outlines,
    upsample_map,
)

IMAGE_TYPES = {
    "image/png",
    "image/jpeg",
    "image/bmp",
    "image/tiff",
    "image/webp",
    "application/octet-stream",  # what many clients send for a file whose type they don't know
}


def _png64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return base64.b64encode(buf.getvalue()).decode()


def decode_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Upload bytes -> uint8 RGB (H, W, 3), or an HTTPException saying what is wrong. Pixels
    convert as a file's do for training and `kdad predict` (``data.io.to_rgb``: 16-bit over
    65535), in the exported graph's 8 bits (``data.io.to_rgb8``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise HTTPException(
                    413, f"{name}: {img.width}x{img.height} is over the {max_pixels} pixel limit"
                )
            img.load()
            arr = pixels(img)
        except HTTPException:
            raise
        except UnidentifiedImageError as e:
            raise HTTPException(400, f"{name}: not an image kdad can read") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise HTTPException(413, f"{name}: image too large ({e})") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise HTTPException(400, f"{name}: truncated or corrupt image ({e})") from e
    try:
        return to_rgb8(arr, name)  # (H, W, 3) uint8
    except KdadError as e:
        raise HTTPException(400, str(e)) from e


def create_app(
    model: str | Path,
    max_bytes: int = ServeConfig.max_bytes,
    max_pixels: int = ServeConfig.max_pixels,
    threads: int | None = None,
) -> FastAPI:
    """The service around one model: an ONNX export (onnxruntime) or a checkpoint (PyTorch),
    run with ``threads`` threads (None: the runtime's default, every core)."""
    runner = load_runner(model, threads=threads)
    cal = runner.calibration
    app = FastAPI(
        title="kdad",
        description="Defect detection by knowledge distillation: score, decide, localise.",
    )
    page = resources.files("kdad").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {
            "status": "ok",
            "model": runner.meta["model"],
            "runtime": runner.runtime,
            "image_size": runner.meta["image_size"],
            "false_alarm_rate": cal.get("false_alarm_rate"),
        }

    @app.post("/predict")
    def predict(
        file: Annotated[UploadFile, File()],
        response: Response,
        outlines: bool = False,
        heatmap: bool = False,
        images: bool = False,
    ) -> dict[str, Any]:
        """Score one image: normalised score (0.5 = threshold; clipped to [0, 1]) and the same
        scale unclipped, decision, defect instances (boxes in original pixels); on request the
        regions' ``outlines`` (polygons in the image's coordinates), the ``heatmap`` (base64
        PNG at the model's resolution), and full-size ``images``: overlay and mask PNGs."""
        tic = time.perf_counter()
        name = file.filename or "upload"
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype not in IMAGE_TYPES:
            raise HTTPException(415, f"{name}: content type {ctype or 'none'} is not an image")
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: upload over the {max_bytes} byte limit")
        rgb = decode_upload(data, name, max_pixels)  # (H, W, 3) uint8
        model_tic = time.perf_counter()
        out = runner.run(rgb[None])
        model_s = time.perf_counter() - model_tic
        h, w = rgb.shape[:2]
        small = out["map"][0]  # (h, w), normalised: 0.5 = pixel threshold
        defect = bool(out["defect"][0])
        raw = float(out["raw_score"][0])
        answer: dict[str, Any] = {
            "filename": name,
            "width": w,
            "height": h,
            "score": float(out["score"][0]),
            "unclipped_score": float(unclipped(raw, cal["image_threshold"], cal["image_low"])),
            "raw_score": raw,
            "decision": "defect" if defect else "ok",
            "instances": [],
        }
        if defect or images:  # a good part has no regions: its map stays small
            heat = np.clip(upsample_map(small, h, w), 0, 1)  # (H, W)
            mask = defect_mask(heat, defect)
            answer["instances"] = find_instances(mask, heat)
        if outlines:
            answer["outlines"] = region_outlines(small, h, w) if defect else []
        if heatmap:
            answer["heatmap_png"] = _png64(heat_png(small))
        if images:
            answer["overlay_png"] = _png64(heatmap_overlay(rgb / 255.0, heat))
            answer["mask_png"] = _png64(Image.fromarray(mask.astype(np.uint8) * 255))
        total_ms = 1000 * (time.perf_counter() - tic)
        response.headers["Server-Timing"] = (
            f"model;dur={1000 * model_s:.2f}, total;dur={total_ms:.2f}"
        )
        return answer

    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` worker processes: model from $KDAD_SERVE_MODEL, its
    share of the cores from $KDAD_SERVE_THREADS."""
    threads = int(os.environ.get("KDAD_SERVE_THREADS", 0)) or None
    return create_app(os.environ["KDAD_SERVE_MODEL"], threads=threads)


def serve(model: str | Path, cfg: ServeConfig) -> None:
    """Run the service with uvicorn: ``cfg.workers`` processes, each loading the model and
    using ``cores // workers`` threads, all accepting on one port."""
    import uvicorn

    host, port, workers = cfg.host, cfg.port, cfg.workers
    if workers > 1:
        os.environ["KDAD_SERVE_MODEL"] = str(Path(model).resolve())
        os.environ["KDAD_SERVE_THREADS"] = str(cores_per(workers))
        load_runner(model)  # fail here, once, rather than in every worker
        uvicorn.run("kdad.serve:app_from_env", factory=True, host=host, port=port, workers=workers)
    else:
        uvicorn.run(create_app(model), host=host, port=port)
