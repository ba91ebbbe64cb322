"""A self-contained HTML page and the figures embedded in it: what `kdad report` and the
synthetic-defect gallery (synth/bank.py) both write."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:left}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:0.85em;max-width:320px;word-break:break-all}
img.thumb{width:320px;height:auto}"""
THUMB = 320  # display width of an image in a page, in CSS pixels: images are embedded at it
# After load, the page records how many of its figures rendered (a test reads it in Chromium).
_CHECK = """<script>window.addEventListener('load',()=>{const im=[...document.images];
document.body.dataset.figures=im.length;
document.body.dataset.rendered=im.filter(i=>i.complete&&i.naturalWidth>0).length;});</script>"""


def png_uri(fig_or_image: Any) -> str:
    """A matplotlib figure or PIL image as a data URI."""
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def jpeg_uri(image: Image.Image, quality: int = 85) -> str:
    """A photo-like PIL image (a part, an overlay) as a JPEG data URI: a tenth of a PNG."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)  # crisp lines
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with the border of ``mask`` (H, W) bool drawn in ``color``,
    2 pixels wide, just outside the region."""
    edge = ndimage.binary_dilation(mask, iterations=2) & ~mask
    out = rgb.copy()
    out[edge] = color
    return out


def img_tag(uri: str, alt: str, caption: str = "", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img{c} src="{uri}" alt="{html.escape(alt)}">{cap}</figure>'


def html_page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f"{_CHECK}</body></html>"
    )
