"""A bank of synthetic defects written by `kdad synth sample`: reading it for training, and
its gallery page."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import numpy as np
from PIL import Image

from kdad.data.layouts import Sample
from kdad.errors import KdadError
from kdad.files import atomic_write
from kdad.page import html_page, img_tag, outline, png_uri


def read_bank(folder: str | Path, keep: list[Sample]) -> list[tuple[Path, Path, Path]]:
    """The (image, mask, source) triples listed in ``folder``/synthetic.csv whose source is one
    of ``keep`` (images held out of fitting never enter training through their copies)."""
    folder = Path(folder)
    index = folder / "synthetic.csv"
    if not index.is_file():
        raise KdadError(f"{folder}: no synthetic.csv here; write one with `kdad synth sample`")
    allowed = {s.path.resolve() for s in keep}
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"image", "mask", "source"} <= set(rows[0]):
        raise KdadError(f"{index}: needs columns image, mask, source")
    bank = [
        (folder / r["image"], folder / r["mask"], Path(r["source"]))
        for r in rows
        if Path(r["source"]).resolve() in allowed
    ]
    if not bank:
        raise KdadError(f"{index}: none of its {len(rows)} defects comes from a training image")
    return bank


def outlined(image: Path, mask: Path) -> Image.Image:
    """``image`` with the border of ``mask`` (same size) drawn in red, 2 pixels wide."""
    rgb = np.array(Image.open(image).convert("RGB"))
    m = np.array(Image.open(mask).convert("L")) > 127
    return Image.fromarray(outline(rgb, m, (255, 0, 0)))


def synthetic_gallery(folder: str | Path, top: int = 24, width: int = 240) -> Path:
    """``folder``/gallery.html from a `kdad synth sample` folder: each of the first ``top``
    defects beside its clean source, and again with its mask outlined."""
    folder = Path(folder)
    with open(folder / "synthetic.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:top]

    def thumb(path: Path | Image.Image) -> str:
        im = path if isinstance(path, Image.Image) else Image.open(path)
        im.thumbnail((width, width))
        return png_uri(im)

    figures = [
        "<div>"
        + img_tag(thumb(Path(r["source"])), "source", f"source {Path(r['source']).name}", "thumb")
        + img_tag(thumb(folder / r["image"]), "synthetic defect", r["image"], "thumb")
        + img_tag(
            thumb(outlined(folder / r["image"], folder / r["mask"])),
            "mask outlined",
            "its mask outlined",
            "thumb",
        )
        + "</div>"
        for r in rows
    ]
    intro = f"<p>The first {len(rows)} synthetic defects of {html.escape(str(folder))}.</p>"
    out = folder / "gallery.html"
    page = html_page("kdad synthetic defects", intro + "".join(figures))
    atomic_write(out, lambda tmp: tmp.write_text(page))
    return out
