"""Typed run configuration: dataclasses, loaded from and saved to YAML, overridden by the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdad.errors import KdadError
from kdad.files import atomic_write


@dataclass
class DataConfig:
    """Where the images are and how they are laid out and sized."""

    path: str = ""
    layout: str = "auto"  # auto | mvtec | folder | mtd
    category: str | None = None  # MVTec category folder, when path is the dataset root
    # input side (square), [height, width], or auto: 256x256, or the training images' shared
    # aspect at about that pixel count when a square would squash them (data.dataset.choose_size)
    image_size: int | list[int] | str = "auto"
    normal_dir: str = "good"  # folder layout: good images
    abnormal_dir: str = "defect"  # folder layout: defective images (test only)
    mask_dir: str = "mask"  # folder layout: masks named like their image
    holdout: float = 0.1  # good training images held out from fitting, for validation
    augment: list[str] = field(default_factory=list)  # training views: hflip, vflip, rot90


@dataclass
class ModelConfig:
    """Which method, which teacher, and the method's own options (see its ``Options``)."""

    # a method (models.MODELS), or auto: the STU-Seg student chosen from the part's good images
    # (engine.choose)
    name: str = "auto"
    backbone: str = "efficientnet_lite0"
    stages: list[str] | None = None  # teacher stages feeding distillation; None = backbone default
    weights: str | None = None  # local teacher weight file; None = package or download cache
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation: RD's official optimiser on a fixed schedule (``epochs``; with ``patience``,
    stopping once that many validations in a row have not beaten the best one)."""

    # epochs, or auto: as many as make 2400 optimiser steps (engine.schedule.STEPS)
    epochs: int | str = "auto"
    batch_size: int = 16
    lr: float = 0.005
    lr_schedule: str = "constant"  # constant (RD's official) | cosine: to ~0 by each phase's end
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # epochs between validations; 0 = once at the end (patience 0), else VAL_STEPS steps' worth
    val_every: int = 0
    select: str = "pixel_ap"  # validation metric choosing the epoch kept as best.pt
    patience: int = 0  # validations without a better ``select`` before stopping; 0 = never stop
    teacher_cache_gb: float = 2.0  # memory for the teacher's features when inputs repeat; 0 = off
    image_cache_gb: float = 2.0  # memory for the decoded, resized training images; 0 = off
    # fp32 | bf16: training's forward in bfloat16 autocast (weights fp32) | auto: bf16 where the
    # device has native bfloat16, else fp32
    precision: str = "auto"


@dataclass
class CalibrationConfig:
    """Thresholds set from held-out good training images (see engine/calibrate.py)."""

    false_alarm_rate: float = 0.01  # share of good parts the image threshold flags
    pixel_quantile: float = 0.999  # quantile of good pixels that is the pixel threshold


@dataclass
class RunConfig:
    """Everything needed to reproduce a run; saved as RUN_DIR/config.yaml and in the checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    out: str = "runs/latest"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) safe for YAML and ``weights_only`` checkpoints."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from nested dicts, rejecting unknown keys with their location."""
        return _build(cls, d, where)


RUNTIMES = ("auto", "onnxruntime", "openvino", "pytorch")  # what scores a trained model


@dataclass
class ScoreConfig:
    """How a trained model scores images (`kdad test`, `predict`, `calibrate`)."""

    batch_size: int = 16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    runtime: str = "auto"  # auto (onnxruntime on the CPU, else PyTorch) | one of RUNTIMES


@dataclass
class DemoConfig:
    """`kdad demo`: generated parts (data/demo_parts.py), the default model trained briefly."""

    out: str = "kdad-demo"  # folder for the parts, the run, the predictions and the report
    epochs: int = 8  # the default model's whole pipeline (both students probed), shortened
    image_size: int = 128  # the parts' side and the input size


@dataclass
class LaunchConfig:
    """How many processes run at once."""

    jobs: int = 1  # runs (or categories) trained at once in separate processes
    nproc: int = 1  # data-parallel ranks on this machine (torchrun; one per GPU)


@dataclass
class ServeConfig:
    """`kdad serve`: where the HTTP service listens and how many processes answer."""

    host: str = "127.0.0.1"  # bind address: this machine only
    port: int = 8000
    workers: int = 1
    max_bytes: int = 20 * 2**20  # largest upload accepted
    max_pixels: int = 50_000_000  # largest decoded image accepted


@dataclass
class DDPMOptions:
    """The diffusion model's architecture and schedule (saved with its checkpoint)."""

    crop: int = 64  # side of the square crops it learns, from images at the detector's size
    channels: int = 3  # 1 for gray parts, 3 for colour
    width: int = 32  # channels of the first U-Net level, doubled per level
    levels: int = 3  # resolutions: 2^0 .. 2^(levels - 1) times smaller
    timesteps: int = 1000
    max_depth: float = 0.5  # steps learnt: those below this share of the schedule


@dataclass
class DiffusionConfig:
    """What ``kdad synth train`` saves with its checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    ddpm: DDPMOptions = field(default_factory=DDPMOptions)
    steps: int = 2000  # optimiser steps
    save_every: int = 250  # steps between saves of the training state, to resume from
    batch_size: int = 16
    lr: float = 2e-4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto: bf16 where the device has it natively
    out: str = "runs/ddpm"


@dataclass
class PaintConfig:
    """How ``kdad synth sample`` paints defects with a trained DDPM."""

    count: int = 200  # defects to paint
    strength: float = 0.3  # diffusion depth, 0-1: the share of the schedule noised and denoised
    sigma: float = 1.0  # std of the Gaussian perturbation inside the region ([-1, 1] range)
    grain: float = 8.0  # pixels over which the perturbation is correlated; 0: white noise
    steps: int = 10  # DDIM denoising steps
    seed: int = 0
    batch_size: int = 16
    min_change: float = 8 / 255  # a pixel is defect where its smoothed change exceeds this
    mask_sigma: float = 2.0  # Gaussian smoothing (pixels) of the change before that test
    # a defect is drawn again unless its change stands this many times out of the part's own
    # structure (synth.diffusion.visibility)
    min_visibility: float = 3.0
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto: bf16 where the CPU has it natively


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise KdadError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in fields:
            raise KdadError(f"{where}: unknown key {k!r}; known: {', '.join(fields)}")
        default = fields[k].default_factory() if callable(fields[k].default_factory) else None
        if dataclasses.is_dataclass(default):
            v = _build(type(default), v, f"{where}.{k}")
        elif isinstance(fields[k].default, tuple):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


RECIPES = Path(__file__).parent / "recipes"  # shipped run configs, by name


def recipe_names() -> list[str]:
    """The shipped recipes (``kdad train --config NAME``)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config, or a shipped recipe by name (``magnetic_tile_stu``); a missing
    file or bad key is a one-line error."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (RECIPES / f"{path}.yaml").is_file():
        path = RECIPES / f"{path}.yaml"
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise KdadError(
            f"{path}: no such config file, and no shipped recipe of that name "
            f"(recipes: {', '.join(recipe_names()) or 'none'})"
        ) from e
    except OSError as e:
        raise KdadError(f"{path}: cannot read config ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise KdadError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from e
    return RunConfig.from_dict(d, str(path))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML (atomically: a crash never leaves half a file)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


# Flat names (CLI flags, keyword arguments of kdad.train) -> dotted config fields.
OVERRIDES = {
    "data": "data.path",
    "layout": "data.layout",
    "category": "data.category",
    "image_size": "data.image_size",
    "holdout": "data.holdout",
    "augment": "data.augment",
    "model": "model.name",
    "backbone": "model.backbone",
    "stages": "model.stages",
    "weights": "model.weights",
    "options": "model.options",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "lr_schedule": "train.lr_schedule",
    "seed": "train.seed",
    "device": "train.device",
    "num_workers": "train.num_workers",
    "val_every": "train.val_every",
    "select": "train.select",
    "patience": "train.patience",
    "teacher_cache_gb": "train.teacher_cache_gb",
    "image_cache_gb": "train.image_cache_gb",
    "precision": "train.precision",
    "false_alarm_rate": "calibration.false_alarm_rate",
    "out": "out",
}


def apply_overrides(cfg: RunConfig, **values: Any) -> RunConfig:
    """Set the fields named by OVERRIDES; None values are left alone; ``options`` (a dict) is
    merged into the model's options."""
    for key, value in values.items():
        if key not in OVERRIDES:
            raise KdadError(f"unknown setting {key!r}; known: {', '.join(OVERRIDES)}")
        if value is None:
            continue
        *parents, leaf = OVERRIDES[key].split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        if key == "options":
            cfg.model.options = {**cfg.model.options, **value}
        else:
            setattr(obj, leaf, str(value) if key in ("data", "out", "weights") else value)
    return cfg
