"""What every benchmark records beside its numbers: machine, date, commit, command."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from kdad.data.layouts import Sample, find_samples, mtd_dev_names, mtd_key


def provenance() -> dict[str, Any]:
    """Machine, UTC date, git commit of the kdad that ran (with a + when its tree has
    changes; the imported package's checkout, not the working directory's), exact command."""
    import kdad

    code = Path(kdad.__file__).parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(code), *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+"
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


_AT_START = provenance()  # the code that ran is the code at start, not at the end


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as kdad.train keywords, each value read as YAML."""
    return {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in items)}


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON with the provenance taken when the benchmark started."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**_AT_START, **result}, indent=2))
    print(f"wrote {path}")


def checkpoint_parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's command line: a checkpoint to rescore and the results file."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", required=True)
    return ap


def mtd_half(data: str | Path, half: str = "dev") -> list[Sample]:
    """The test samples of one half ("dev" or "final") of Magnetic Tile at ``data``."""
    dev = mtd_dev_names()
    test = find_samples(data, "test", "mtd")
    return [s for s in test if (mtd_key(s.path) in dev) == (half == "dev")]
