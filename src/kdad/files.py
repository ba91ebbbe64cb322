"""Atomic file writes: a crash mid-write never leaves half a file where a whole one was."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a hidden temporary file beside ``path`` (``.NAME.tmp``), then rename
    it over ``path``: readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
