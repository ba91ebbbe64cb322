"""The Python API behind the CLI: one function per ``kdad`` verb, plus ``load`` for a Detector.

Every function here is also ``kdad.NAME`` except ``report``, ``export`` and ``serve``: those names
belong to the submodules kdad.report, kdad.export and kdad.serve, so call them as ``kdad.api.NAME``.
Modules that only one verb needs (ONNX, the web service, the DDPM, the grid) are imported inside
its function, so ``import kdad`` and ``kdad --help`` stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdad.config import (
    DataConfig,
    DDPMOptions,
    DemoConfig,
    DiffusionConfig,
    LaunchConfig,
    PaintConfig,
    RunConfig,
    ScoreConfig,
    ServeConfig,
    apply_overrides,
    load_config,
)
from kdad.detector import Detector, Prediction, recalibrate
from kdad.engine import choose
from kdad.errors import KdadError
from kdad.protocol import evaluate


def train(
    cfg: RunConfig | None = None,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train a model; returns the checkpoint to use (RUN_DIR/best.pt, see engine.fit).

    ``cfg`` (or the YAML file ``config``) gives the base settings, keyword ``overrides`` such as
    ``data=..., epochs=..., out=...`` replace single fields (names as the CLI flags).
    """
    if cfg is None:
        cfg = load_config(config) if config else RunConfig()
    cfg = apply_overrides(cfg, **overrides)
    if not resume and not cfg.data.path:
        raise KdadError("no training data: give data=PATH (--data)")
    return choose.train(cfg, resume=resume, progress=progress)


def _train_one(kwargs: dict[str, Any]) -> Path:
    return train(**kwargs)


def train_categories(
    categories: list[str],
    jobs: int = LaunchConfig.jobs,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Path]:
    """Train one model per category of a dataset root, into OUT/<category>, ``jobs`` at a time
    in separate processes. With ``resume`` each category continues its run (a finished one is
    left as it is; one never started starts); without, an existing run is an error for that
    category only. Returns each category's checkpoint; failures are raised together at the end."""
    from kdad.engine.pool import run_parallel

    base = load_config(config) if config else RunConfig()
    base = apply_overrides(base, **overrides)
    if not base.data.path:
        raise KdadError("no training data: give data=PATH (--data)")
    runs = []
    for cat in categories:
        out = Path(base.out) / cat
        cfg = apply_overrides(RunConfig.from_dict(base.to_dict()), category=cat, out=out)
        again = resume and (out / "checkpoint.pt").is_file()
        runs.append({"cfg": cfg, "resume": again, "progress": progress and jobs == 1})
    done, failed = run_parallel(
        _train_one, runs, jobs, lambda r: f"{r['cfg'].data.category} ({r['cfg'].out})"
    )
    if failed:
        first = min(failed)
        raise KdadError(
            f"{len(failed)} of {len(categories)} categories failed; "
            f"first: {categories[first]}: {failed[first]}"
        )
    return {categories[i]: path for i, path in sorted(done.items())}


def load(
    checkpoint: str | Path,
    device: str = ScoreConfig.device,
    runtime: str = ScoreConfig.runtime,
) -> Detector:
    """Load a trained checkpoint (file or run folder) as a Detector scoring on ``runtime``
    (auto: the model's graph in onnxruntime on the CPU, PyTorch on a GPU)."""
    return Detector.load(checkpoint, device, runtime)


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    batch_size: int = ScoreConfig.batch_size,
    device: str = ScoreConfig.device,
    f1_threshold_from: str | Path | None = None,
    progress: bool = True,
    runtime: str = ScoreConfig.runtime,
    heatmaps: bool = True,
    masks: bool = True,
) -> tuple[Path, float | None]:
    """Score image files and folders into ``out`` (see Detector.predict_files); returns
    OUT/predictions.csv and the image threshold set F1-best on the labelled validation folder
    ``f1_threshold_from`` (None: the calibrated one is kept); ``progress``: a bar on stderr;
    ``runtime``: what scores (config.RUNTIMES); ``heatmaps``, ``masks``: False writes no such
    files (the lines only)."""
    det = load(checkpoint, device, runtime)
    threshold = det.use_f1_threshold(f1_threshold_from) if f1_threshold_from else None
    csv_path = det.predict_files(inputs, out, batch_size, progress, heatmaps, masks)
    return csv_path, threshold


def report(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of a run folder, a metrics.json or a predict folder
    (default: report.html beside it); returns its path."""
    from kdad.report import build_report

    return build_report(source, out)


def calibrate(
    checkpoint: str | Path,
    false_alarm_rate: float | None = None,
    pixel_quantile: float | None = None,
    device: str = ScoreConfig.device,
) -> dict[str, Any]:
    """Recompute a checkpoint's thresholds from its held-out good images, after the model fits
    them again (its per-scale weights), and write both into the checkpoint; returns the new
    calibration. None keeps the rate or quantile it was trained with."""
    return recalibrate(checkpoint, false_alarm_rate, pixel_quantile, device)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out``/model.onnx (resize, model and calibrated decision in one graph) and
    ``out``/kdad.json, checked against PyTorch with onnxruntime; returns the .onnx path."""
    from kdad.export import export_onnx

    return export_onnx(checkpoint, out)


def serve(
    model: str | Path,
    host: str = ServeConfig.host,
    port: int = ServeConfig.port,
    workers: int = ServeConfig.workers,
) -> None:
    """Serve one model (an export folder, or a checkpoint or run folder) over HTTP with a web
    page, in ``workers`` processes; returns when the server stops."""
    from kdad.serve import serve as run_server

    run_server(model, ServeConfig(host, port, workers))


def synth_train(
    data: str | Path,
    out: str | Path = DiffusionConfig.out,
    layout: str | None = None,
    category: str | None = None,
    image_size: int | list[int] | str = DataConfig.image_size,
    crop: int = DDPMOptions.crop,
    steps: int = DiffusionConfig.steps,
    batch_size: int = DiffusionConfig.batch_size,
    lr: float = DiffusionConfig.lr,
    width: int = DDPMOptions.width,
    seed: int = DiffusionConfig.seed,
    device: str = DiffusionConfig.device,
    progress: bool = True,
) -> Path:
    """Train a DDPM of a dataset's good training images (``crop``-square crops of them at the
    detector's ``image_size``, gray or colour as the images are) to paint synthetic defects;
    returns ``out``/ddpm.pt. An interrupted training in ``out`` with the same settings resumes
    from its last save."""
    from kdad.synth.diffusion import train_ddpm

    cfg = DiffusionConfig(
        data=DataConfig(
            path=str(data), layout=layout or "auto", category=category, image_size=image_size
        ),
        ddpm=DDPMOptions(crop=crop, width=width, channels=0),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        out=str(out),
    )
    return train_ddpm(cfg, progress=progress)


def synth_sample(
    model: str | Path,
    out: str | Path,
    count: int = PaintConfig.count,
    data: str | None = None,
    strength: float = PaintConfig.strength,
    sigma: float = PaintConfig.sigma,
    grain: float = PaintConfig.grain,
    steps: int = PaintConfig.steps,
    seed: int = PaintConfig.seed,
    min_change: float = PaintConfig.min_change,
    mask_sigma: float = PaintConfig.mask_sigma,
    min_visibility: float = PaintConfig.min_visibility,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Paint ``count`` defects with a trained DDPM into the MVTec-layout folder ``out`` (images
    from ``data``, default the DDPM's own) and an HTML gallery of them; returns
    OUT/synthetic.csv and the gallery."""
    from kdad.synth.bank import synthetic_gallery
    from kdad.synth.diffusion import sample_defects

    paint = PaintConfig(
        count=count,
        strength=strength,
        sigma=sigma,
        grain=grain,
        steps=steps,
        seed=seed,
        min_change=min_change,
        mask_sigma=mask_sigma,
        min_visibility=min_visibility,
    )
    folder = sample_defects(model, out, paint, data, progress=progress)
    return folder / "synthetic.csv", synthetic_gallery(folder)


def bench(
    grid: str | Path,
    progress: bool = True,
    models: list[str] | None = None,
    jobs: int = LaunchConfig.jobs,
    seeds: list[int] | None = None,
) -> tuple[Path, Path]:
    """Run the unfinished jobs of a grid YAML (only ``models``, by name, and ``seeds``, when
    given), ``jobs`` at a time, and tabulate every finished run; returns the Markdown and CSV
    tables."""
    from kdad.grid import run_grid

    return run_grid(grid, progress, models, jobs, seeds)


def demo(
    out: str | Path = DemoConfig.out, progress: bool = True, epochs: int = DemoConfig.epochs
) -> dict[str, Any]:
    """kdad's main job on generated parts (data/demo_parts.py), no data of one's own and no
    network needed: write the parts to OUT/data, train the default model on the good ones
    (OUT/run), test it on the labelled test set, predict the test folder (OUT/predictions, with
    heatmaps and masks) and write the report. Returns the paths and the test's metrics."""
    from kdad.data.demo_parts import write_demo_set
    from kdad.report import build_report

    out = Path(out)
    if (out / "run").exists():
        raise KdadError(f"{out / 'run'} exists: give another --out, or remove it")
    size = DemoConfig.image_size
    data = write_demo_set(out / "data", size=size)
    ckpt = train(data=data, out=out / "run", image_size=size, epochs=epochs, progress=progress)
    result = evaluate(ckpt, out=out / "run")
    csv_path, _ = predict(ckpt, [data / "test"], out / "predictions", progress=False)
    return {
        "data": data,
        "checkpoint": ckpt,
        "metrics": result["metrics"],
        "predictions": csv_path,
        "report": build_report(out / "run"),
    }


__all__ = [
    "Detector",
    "Prediction",
    "bench",
    "calibrate",
    "demo",
    "evaluate",
    "export",
    "load",
    "predict",
    "report",
    "serve",
    "synth_sample",
    "synth_train",
    "train",
    "train_categories",
]
