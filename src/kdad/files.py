"""Atomic file writes: a crash mid-write never leaves half a file where a whole one was."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a hidden temporary file beside ``path`` (``.NAME.RANDOM.tmp``, its
    own, so that writers of one path at once, e.g. parallel runs caching one graph template,
    never share it), then rename it over ``path``: readers see the old file or a whole new one,
    never a partial one. A write that fails leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
