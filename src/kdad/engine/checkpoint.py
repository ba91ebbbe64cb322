"""Checkpoints: state dict + config (+ optimiser, epoch, calibration), nothing pickled but
tensors and plain data. Written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def load_weights(model: nn.Module, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint's state dict into ``model``. Weights of another architecture (a
    checkpoint from a kdad whose model was built differently) are a one-line error naming the
    file and the first mismatch."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        name = type(model).__name__
        raise KdadError(
            f"{ckpt.get('path', 'checkpoint')}: its weights do not fit this kdad's {name} "
            f"({detail}); it was saved by a kdad that built {name} differently: retrain it"
        ) from e
