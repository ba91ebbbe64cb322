"""A self-contained HTML page and the figures embedded in it: what `kdad report` and the
synthetic-defect gallery (synth/bank.py) both write."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:left}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:0.85em;max-width:240px;word-break:break-all}
img.thumb{width:240px;height:auto}"""
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
