"""One writer per run folder: a second training process is refused, and a dead holder leaves
no stale lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_mvtec

import kdad
from kdad.errors import KdadError

HOLD = """
import sys, time
from pathlib import Path
from kdad.engine.lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_killed_one_frees_the_folder(tmp_path: Path) -> None:
    data, run = make_mvtec(tmp_path / "data", n_train=6), tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KdadError, match=rf"another process \(pid {holder.pid}\)"):
            kdad.train(data=data, epochs=1, batch_size=4, image_size=32, out=run, progress=False)
        assert not (run / "checkpoint.pt").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    ckpt = kdad.train(data=data, epochs=1, batch_size=4, image_size=32, out=run, progress=False)
    assert ckpt.is_file()
