"""Checkpoints: state dict + config (+ optimiser, epoch, calibration), nothing pickled but
tensors and plain data. Written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kdad.errors import KdadError
from kdad.files import atomic_write

FORMAT = "kdad-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (must hold "config" and "model") to a temp file, fsync, then rename over
    ``path``: a crash mid-write leaves the previous checkpoint intact."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a kdad checkpoint (file or run folder) safely; anything else is a one-line error
    naming the file."""
    path = Path(path)
    if path.is_dir():  # a run folder: the epoch chosen on validation, else the last one
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "checkpoint.pt"
    if not path.is_file():
        raise KdadError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types for a bad or foreign file
        raise KdadError(f"{path}: not a readable kdad checkpoint ({str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise KdadError(f"{path}: not a kdad checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise KdadError(f"{path}: checkpoint version {ckpt['version']} is newer than this kdad")
    ckpt["path"] = str(path)
    return ckpt
