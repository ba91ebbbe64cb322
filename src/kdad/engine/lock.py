"""One writer per run folder: a second process training into the same folder is refused
instead of interleaving its checkpoints with the first's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdad.errors import KdadError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded there
    fcntl = None


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``/.lock exclusively for the block. The lock is the operating system's
    (flock), so a process that dies frees it: a crash never leaves a stale lock behind."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    with open(path, "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise KdadError(
                    f"{folder}: another process (pid {holder}) is training into this folder"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        yield
