"""The runtimes a trained model scores on: PyTorch eager, or the model's ONNX graph in onnxruntime
(the default on the CPU: 2.7-4.5x the images/s of PyTorch eager in `kdad predict`,
docs/benchmarks.md) or OpenVINO where it is installed.

The graph is the model alone: the normalised batch (B, 3, h, w) in, the raw anomaly map
(B, h, w) and score (B,) out, so every runtime answers what PyTorch answers; each new graph is
checked against PyTorch on random input before use (maps and scores within 1e-4 of their range).
Writing a graph takes seconds, so it is kept in a cache folder (``KDAD_CACHE``, else
``~/.cache/kdad``), named by a hash of the weights, the config, the code and the library
versions that made it: the next load of the same model reuses it, any change writes a new one.
Beside each graph goes its template, the exported graph before optimisation, named by the same
hash without the weights' values: a model of the same architecture (another seed, a retrained
run) puts its weights into the template instead of exporting again (under a second against 10 s
or more), and the result is checked like any graph; one that does not reproduce PyTorch is
exported afresh.
Each use marks a graph as used; graphs unused for ``KEEP_DAYS`` go when a new one is written,
and so do the exports `kdad serve` keeps there (export.cached_export).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from kdad.config import RUNTIMES
from kdad.errors import KdadError, KdadWarning
from kdad.files import atomic_write
from kdad.models import KDModel, Output

SRC = Path(__file__).resolve().parents[1]  # the kdad package: its code is part of the key
TOLERANCE = 1e-4  # of the range of the maps and scores compared
KEEP_DAYS = 30  # a cached graph unused this long is removed when another is written


class Scorer(Protocol):
    """A trained model on one runtime: normalised (B, 3, h, w) in, Output on the CPU out."""

    runtime: str

    def __call__(self, x: Tensor) -> Output: ...


class EagerScorer:
    """The model in PyTorch, on its own device."""

    runtime = "pytorch"

    def __init__(self, model: KDModel) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Output:
        out = self.model(x.to(self.device))
        return Output(out.anomaly_map.float().cpu(), out.score.float().cpu())


class GraphScorer:
    """The model's ONNX graph in onnxruntime or OpenVINO (float32), on the CPU."""

    def __init__(self, path: Path, runtime: str, threads: int) -> None:
        self.runtime = runtime
        self.path = path
        self._run = (
            _openvino(path, threads) if runtime == "openvino" else _onnxruntime(path, threads)
        )

    def __call__(self, x: Tensor) -> Output:
        amap, score = self._run(x.float().contiguous().numpy())
        return Output(torch.from_numpy(np.asarray(amap)), torch.from_numpy(np.asarray(score)))


def as_scorer(model: KDModel | Scorer) -> Scorer:
    """A scorer as it is; a model as its eager scorer."""
    return EagerScorer(model) if isinstance(model, nn.Module) else model


def ort_session(path: Path, threads: int | None) -> Any:
    """An onnxruntime CPU session of the graph at ``path`` on ``threads`` threads (None: every
    core), its idle threads sleeping rather than spinning: between calls this process decodes,
    resizes and writes on the same cores (docs/benchmarks.md: 16.5 -> 35.8 images/s)."""
    import onnxruntime as ort  # here: `import kdad` stays fast

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _onnxruntime(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    session = ort_session(path, threads)
    return lambda x: session.run(None, {"x": x})


def _openvino(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import openvino as ov  # available_runtime has checked it is there

    # float32 as the others: by default OpenVINO computes in bfloat16 on CPUs that have it
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return lambda x: list(compiled(x).values())


def available_runtime(choice: str, device: torch.device) -> str:
    """The runtime ``choice`` names; auto: onnxruntime on the CPU, PyTorch on a GPU."""
    if choice not in RUNTIMES:
        raise KdadError(f"runtime must be one of {', '.join(RUNTIMES)}, got {choice!r}")
    if choice == "auto":
        return "onnxruntime" if device.type == "cpu" else "pytorch"
    if choice != "pytorch" and device.type != "cpu":
        raise KdadError(f"runtime {choice} runs on the CPU; this model is on {device}")
    if choice == "openvino" and importlib.util.find_spec("openvino") is None:
        raise KdadError("runtime openvino: OpenVINO is not installed (pip install openvino)")
    return choice


def make_scorer(model: KDModel, hw: tuple[int, int], choice: str = "auto") -> Scorer:
    """``model`` (in eval) on the runtime ``choice`` for inputs of size ``hw``. With auto, a
    graph that cannot be written or does not reproduce PyTorch falls back to PyTorch with a
    warning; with a runtime named, that is an error."""
    eager = EagerScorer(model)
    runtime = available_runtime(choice, eager.device)
    if runtime == "pytorch":
        return eager
    try:
        return GraphScorer(cached_graph(model, hw), runtime, torch.get_num_threads())
    except KdadError as e:
        if choice != "auto":
            raise
        warnings.warn(f"{e}; scoring with PyTorch", KdadWarning, stacklevel=2)
        return eager


def cache_dir() -> Path:
    """Where graphs are kept: ``KDAD_CACHE``, else ``$XDG_CACHE_HOME/kdad`` or ~/.cache/kdad."""
    if os.environ.get("KDAD_CACHE"):
        return Path(os.environ["KDAD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdad"


def graph_key(
    model: KDModel, hw: tuple[int, int], extra: object = None, weights: bool = True
) -> str:
    """A hash of everything the graph depends on: weights, config, input size, code, versions
    (and ``extra``, by its repr: what else a graph holds, e.g. a calibration). Without
    ``weights``, the state dict counts by its names, shapes and dtypes (a template's key); the
    buffers outside it (fixed kernels) count by value either way."""
    from importlib.metadata import version

    h = hashlib.sha256()
    versions = (torch.__version__, version("onnxruntime"), version("onnx"), version("onnxscript"))
    h.update(repr((type(model).__name__, model.opt, hw, versions, extra, weights)).encode())
    state = model.state_dict()
    for name, t in state.items():
        h.update(name.encode())
        if weights:
            h.update(_bytes(t))
        else:
            h.update(repr((tuple(t.shape), t.dtype)).encode())
    for name, t in model.named_buffers():
        if name not in state:
            h.update(name.encode())
            h.update(_bytes(t))
    for path in sorted(SRC.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _bytes(t: Tensor) -> np.ndarray:
    """A tensor's values as bytes, for hashing."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def cached_graph(model: KDModel, hw: tuple[int, int]) -> Path:
    """The model's graph from the cache, written (and checked against PyTorch) when absent: from
    its architecture's template where there is one, else exported."""
    folder = cache_dir() / "graphs"
    path = folder / f"{graph_key(model, hw)}.onnx"
    if path.is_file():
        os.utime(path)  # used now
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdadError(f"{folder}: cannot keep the model's graph there ({e})") from e
    template = folder / f"{graph_key(model, hw, weights=False)}.template.onnx"
    example = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()

    def write(tmp: Path) -> None:
        if template.is_file():
            os.utime(template)  # used now
            try:
                fill_template(template, model, tmp)
                check_graph(model, GraphScorer(tmp, "onnxruntime", threads), example)
                return
            except KdadError:
                pass  # a template this model's weights do not fit: export afresh, below
        write_onnx(model, example, tmp, {"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
                   ["x"], ["map", "score"], template=template)  # fmt: skip
        check_graph(model, GraphScorer(tmp, "onnxruntime", threads), example)

    atomic_write(path, write)
    prune(path.parent)
    return path


def prune(folder: Path, days: float = KEEP_DAYS) -> None:
    """Remove the graphs and templates (``*.onnx``), exports (folders) and temporary files of
    killed writers (``*.tmp``) in ``folder`` unused for ``days`` (their modification time is
    their last use); one that another process removes first is left to it."""
    cutoff = time.time() - days * 86400
    for old in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if old.stat().st_mtime >= cutoff:
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            elif old.suffix in (".onnx", ".tmp"):
                old.unlink()


def check_graph(model: KDModel, graph: Scorer, x: Tensor) -> None:
    """Raise unless ``graph`` reproduces the model on ``x``: maps and scores within
    ``TOLERANCE`` of their range."""
    ref, got = EagerScorer(model)(x), graph(x)
    for name, a, b in (("map", ref.anomaly_map, got.anomaly_map), ("score", ref.score, got.score)):
        scale = max(float(a.abs().max()), 1.0)
        if a.shape != b.shape or float((a - b).abs().max()) > TOLERANCE * scale:
            raise KdadError(f"the {type(model).__name__} graph does not reproduce PyTorch's {name}")


@contextlib.contextmanager
def _quiet_export() -> Any:
    """The exporter's warnings and log lines (optional operators it skips) silenced."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def write_onnx(
    module: nn.Module,
    example: Tensor,
    path: Path,
    dynamic_shapes: dict[str, dict[int, Any]],
    input_names: list[str],
    output_names: list[str],
    opset: int = 18,
    template: Path | None = None,
) -> None:
    """``module`` (in eval) as one self-contained ONNX file at ``path``, by torch.export; with
    ``template``, the graph before optimisation is also written there (fill_template)."""
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                module,
                (example,),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                optimize=False,
                verbose=False,
            )
            if template is not None:
                atomic_write(template, lambda tmp: program.save(tmp, external_data=False))
            program.optimize()
            program.save(path, external_data=False)
    except Exception as e:  # the exporter raises many types; the cause is kept
        raise KdadError(f"{type(module).__name__} could not be exported to ONNX ({e})") from e


def fill_template(template: Path, module: nn.Module, path: Path) -> None:
    """The graph write_onnx writes for ``module``, made from ``template`` (the graph before
    optimisation of a module of the same architecture): its weights are put in by name, then
    the graph is optimised as the exporter does. The caller checks the result."""
    from onnxscript import ir

    try:
        with _quiet_export():
            program = torch.onnx.ONNXProgram(ir.load(template), None)
            initializers = program.model.graph.initializers
            program.apply_weights(
                {k: v.detach() for k, v in module.state_dict().items() if k in initializers}
            )
            program.optimize()
            program.save(path, external_data=False)
    except Exception as e:  # onnx and the IR raise many types; the cause is kept
        raise KdadError(f"{template}: not a usable graph template ({e})") from e
