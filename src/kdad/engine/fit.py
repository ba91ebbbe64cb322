"""The training loop: seeded, one progress bar with loss and ETA, a checkpoint every epoch,
and resume that reproduces an unbroken run exactly.

Under torchrun it is data-parallel: DistributedDataParallel over the trainable parts,
BatchNorm over the global batch, each rank a DistributedSampler shard of every global batch
(``train.batch_size`` is the global batch), and rank 0 alone validating, logging, showing
progress and writing checkpoints.

The loop knows no method: the model says what it trains on (``train_set``) and in which
phases (``phases``)."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from kdad.backbones import get_spec
from kdad.config import RunConfig, save_config
from kdad.data.dataset import AUTO, TrainSet, check_image_size, choose_size, squash_advice
from kdad.data.layouts import Sample, training_samples
from kdad.engine.calibrate import calibrate
from kdad.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from kdad.engine.distributed import (
    Rank,
    barrier,
    broadcast,
    current,
    ensure_group,
    native_bf16,
    resolve_device,
    sync_batchnorm,
)
from kdad.engine.evaluate import evaluate_model
from kdad.engine.infer import fit_normal
from kdad.engine.lock import run_lock
from kdad.engine.loop import optimiser_step, progress_bar, random_state, restore_random_state
from kdad.engine.schedule import (
    STEPS,
    Pace,
    auto_epochs,
    checkpoint_interval,
    learning_rate,
    phase_at,
    phase_warnings,
    plan_message,
    should_stop,
    stop_message,
    validation_interval,
)
from kdad.engine.teacher_cache import TeacherCache, build_cache
from kdad.errors import KdadError, KdadWarning
from kdad.metrics import METRIC_NAMES
from kdad.models import (
    LR_SCHEDULES,
    MODELS,
    KDModel,
    Phase,
    model_from_config,
    saved_options,
)
from kdad.synth.datasets import SyntheticValidationSet

PRECISIONS = ("fp32", "bf16", AUTO)  # of training's forward; bf16 under autocast, weights fp32
# auto: bf16 where the device has native bfloat16 arithmetic, else fp32


def size_multiple(model: KDModel) -> int:
    """What every side of the model's input must be a multiple of: twice its deepest stride."""
    return 2 * max(model.teacher.strides)


def check_input_size(model: KDModel, hw: tuple[int, int], device: torch.device) -> None:
    """One eval pass at the input size, so that feature maps which do not line up at this size
    are a clear error before training, not a shape mismatch inside it."""
    model.eval()
    try:
        with torch.no_grad():
            model(
                torch.zeros(1, 3, *hw, device=device).contiguous(memory_format=torch.channels_last)
            )
    except RuntimeError as e:
        raise KdadError(
            f"image_size {hw[0]}x{hw[1]} does not suit this model and its stages: their feature "
            f"maps do not line up ({str(e).splitlines()[0]}); use sides that are multiples of "
            f"{size_multiple(model)}"
        ) from e


def datasets(
    cfg: RunConfig, model: KDModel, progress: bool = False
) -> tuple[TrainSet, SyntheticValidationSet | None]:
    """What ``model`` trains on, from the good training images of ``cfg.data`` (whatever it
    makes for that, in the run folder: by rank 0 first, the other ranks then reuse it), and the
    validation set made from the held-out fraction (``data.holdout``) with synthetic defects;
    None when nothing is held out."""
    d = cfg.data
    fit_samples, held = training_samples(d)
    spec = get_spec(cfg.model.backbone)
    cache = cfg.train.image_cache_gb * 2**30
    images = TrainSet(
        fit_samples, d.image_size, spec.mean, spec.std, cfg.train.seed, d.augment, cache
    )
    main = current().main
    if main:
        train = model.train_set(images, Path(cfg.out), progress)
    barrier()
    if not main:
        train = model.train_set(images, Path(cfg.out), False)
    return train, validation_set(cfg, held)


def validation_set(
    cfg: RunConfig, held: list[Sample], draws: int = 1
) -> SyntheticValidationSet | None:
    """The ``held`` out good training images, at ``cfg``'s size and teacher normalisation,
    each also with ``draws`` synthetic defects; None when nothing is held out."""
    if not held:
        return None
    spec = get_spec(cfg.model.backbone)
    return SyntheticValidationSet(held, cfg.data.image_size, spec.mean, spec.std, draws=draws)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On ``device``, image batches channels-last like the model."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    return x.to(device, memory_format=fmt)


def _loader(ds: TrainSet, cfg: RunConfig, epoch: int, r: Rank) -> DataLoader:
    """This rank's share of every global batch, shuffled by a generator seeded from (seed,
    epoch): resuming at any epoch replays it, and one rank sees exactly the order it had before
    DDP existed. Ranks get interleaved indices of one permutation, so global batch k is the same
    images on any number of ranks (the sampler pads the last one when the count is not divisible).

    A last batch of a single image is dropped on one rank (that image comes in another batch
    next epoch): BatchNorm cannot train on one sample of 1x1 features.
    """
    sampler = DistributedSampler(
        ds, num_replicas=r.world, rank=r.rank, shuffle=True, seed=cfg.train.seed * 100_003
    )
    sampler.set_epoch(epoch)
    bs = cfg.train.batch_size // r.world
    return DataLoader(
        ds,
        batch_size=bs,
        sampler=sampler,
        num_workers=cfg.train.num_workers,
        drop_last=r.world == 1 and len(ds) > 1 and len(ds) % bs == 1,
    )


def fit(cfg: RunConfig, resume: bool = False, progress: bool = True, pause: float = 1.0) -> Path:
    """Train ``cfg`` into ``cfg.out``; returns the checkpoint to use: ``best.pt`` (the epoch
    scoring best on the synthetic validation set) when images were held out, else
    ``checkpoint.pt`` (the last epoch, also the one that ``resume`` continues).

    An existing run folder is never overwritten: continue it with ``resume=True`` (its saved
    config wins, except that ``train.epochs`` may be raised, and it stays where it is now) or
    choose another ``out``. While training, the folder is locked (rank 0 holds it): a second
    process is refused. ``pause`` < 1 stops after that share of the schedule's epochs, with a
    checkpoint that ``resume`` continues exactly (``engine.choose`` probes students so).
    """
    if not current().main:
        return _fit(cfg, resume, progress, pause)
    with run_lock(Path(cfg.out)):
        return _fit(cfg, resume, progress, pause)


@dataclass
class _Run:
    """Everything one training run holds while its epochs go by."""

    cfg: RunConfig
    out: Path
    r: Rank
    device: torch.device
    model: KDModel
    net: nn.Module  # what runs the training forward pass (the model, or DDP around it)
    opt: torch.optim.Optimizer
    ds: TrainSet
    val: SyntheticValidationSet | None
    phases: list[Phase]
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    start: int  # the first epoch to train (0-based)
    notes: list[str]  # what was chosen for this run by itself: its start lines
    cache: TeacherCache | None = None

    @property
    def holdout(self) -> list[str]:
        return [str(s.path) for s in self.val.samples] if self.val else []


def _fit(cfg: RunConfig, resume: bool, progress: bool, pause: float) -> Path:
    cfg, state = _start(cfg, resume)
    run = _setup(cfg, state, progress)
    t, r, say = cfg.train, run.r, progress and run.r.main
    steps = len(_loader(run.ds, cfg, 0, r))
    every = validation_interval(t.val_every, steps, t.epochs, t.patience)
    keep = checkpoint_interval(steps)
    _warn(run, steps, state is None)
    if say:
        held = len(run.val.samples) if run.val else 0
        plan = (cfg.model.name, len(run.ds), held, t.epochs, steps, every, t.patience, t.select)
        for line in [*run.notes, plan_message(*plan)]:
            tqdm.write(line, file=sys.stderr)
    # a resumed run that had already stopped early trains no further
    last = run.start if should_stop(run.history, run.best, t.patience) else t.epochs
    if pause < 1:
        last = min(last, max(1, round(pause * t.epochs)))
    if last > run.start:
        _fill_cache(run, say)
    pace = Pace(steps, t.epochs * steps - run.start * steps, t.patience > 0 and run.val is not None)
    bar = progress_bar(t.epochs * steps, run.start * steps, say)
    for epoch in range(run.start, last):
        entry = _train_epoch(run, epoch, bar, pace, say)
        if not r.main:
            if broadcast(False):  # rank 0's decision to stop early
                break
            continue
        due = (epoch + 1) % every == 0 or epoch + 1 == t.epochs
        save = (epoch + 1) % keep == 0 or epoch + 1 in (last, t.epochs)
        if _end_epoch(run, epoch, entry, due and phase_at(run.phases, epoch).scoring, save, bar):
            if say:
                tqdm.write(stop_message(epoch + 1, run.history, run.best), file=sys.stderr)
            break
    bar.close()
    return broadcast(run.out / "best.pt" if run.best else run.out / "checkpoint.pt")


def _start(cfg: RunConfig, resume: bool) -> tuple[RunConfig, dict[str, Any] | None]:
    """The run's config, checked, and the checkpoint it resumes (None for a new run)."""
    ckpt_path = Path(cfg.out) / "checkpoint.pt"
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise KdadError(f"{ckpt_path}: nothing to resume")
        state = load_checkpoint(ckpt_path)
        epochs, out = cfg.train.epochs, cfg.out
        cfg = RunConfig.from_dict(state["config"], str(ckpt_path))
        cfg.out = out  # a run folder moved since goes on where it is
        if isinstance(epochs, int):
            cfg.train.epochs = max(epochs, cfg.train.epochs)
    elif ckpt_path.exists():
        raise KdadError(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    t = cfg.train
    if t.epochs != AUTO and (not isinstance(t.epochs, int) or t.epochs < 1):
        raise KdadError(f"epochs must be a number of at least 1 or {AUTO!r}, got {t.epochs!r}")
    if t.batch_size < 1 or t.val_every < 0 or t.patience < 0:
        raise KdadError("batch size must be at least 1, val_every and patience at least 0")
    if t.select not in METRIC_NAMES:
        raise KdadError(f"select must be a metric: one of {', '.join(METRIC_NAMES)}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise KdadError(f"lr_schedule must be {' or '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    if t.precision not in PRECISIONS:
        names = f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}"
        raise KdadError(f"precision must be {names}, got {t.precision!r}")
    check_image_size(cfg.data.image_size)
    if cfg.data.path:  # absolute, so the run can be tested and resumed from anywhere
        cfg.data.path = str(Path(cfg.data.path).resolve())
    cfg.model.options = saved_options(cfg.model)  # saved in full: defaults may change
    if cfg.model.stages is None and cfg.model.name in MODELS:  # saved: defaults may change
        cfg.model.stages = MODELS[cfg.model.name].default_stages(cfg.model.backbone)
    return cfg, state


def _setup(cfg: RunConfig, state: dict[str, Any] | None, progress: bool) -> _Run:
    """Seeded model, data, data-parallel wrapper and optimiser; resumed from ``state``."""
    t, out = cfg.train, Path(cfg.out)
    device = resolve_device(t.device)
    r = ensure_group(device)
    if t.batch_size % r.world:
        raise KdadError(f"batch size {t.batch_size} is not divisible by the {r.world} ranks")
    torch.manual_seed(t.seed)
    # channels-last: about 1.5x faster training steps on CPU (measured on the distillation models)
    model = model_from_config(cfg.model, pretrained=state is None).to(
        device, memory_format=torch.channels_last
    )
    notes = _choose(cfg, model, device)
    if r.main:
        out.mkdir(parents=True, exist_ok=True)
    ds, val = datasets(cfg, model, progress and r.main)
    if t.epochs == AUTO:
        steps = len(_loader(ds, cfg, 0, r))
        t.epochs = auto_epochs(steps, model.schedule_steps(STEPS))
        notes.append(f"kdad: {t.epochs} epochs, chosen: {t.epochs * steps} optimiser steps")
    if r.main:
        save_config(cfg, out / "config.yaml")
    if state is not None:
        load_weights(model, state)
    check_input_size(model, ds.size, device)
    net: nn.Module = model
    if r.world > 1:
        model = sync_batchnorm(model, device)
        # some parameters sit out some steps (a phased model's)
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    opt = torch.optim.Adam(
        model.param_groups(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay
    )
    start, history, best = 0, [], None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start, history, best = state["epoch"], list(state["history"]), state.get("best")
        if "random" in state:  # checkpoints from before kdad saved it go on without
            restore_random_state(state["random"], device)
    phases = model.phases(t.epochs)
    return _Run(cfg, out, r, device, model, net, opt, ds, val, phases, history, best, start, notes)


def _choose(cfg: RunConfig, model: KDModel, device: torch.device) -> list[str]:
    """Settings left to ``auto`` made concrete in ``cfg`` (and so in the saved config): the
    input size from the training images, bfloat16 where the device has it natively. Returns
    the lines that say what was chosen."""
    notes = []
    if cfg.data.image_size == AUTO:
        cfg.data.image_size, line = choose_size(training_samples(cfg.data)[0], size_multiple(model))
        notes.append(line)
    if cfg.train.precision == AUTO:
        native = native_bf16(device)
        cfg.train.precision = "bf16" if native else "fp32"
        where = f"this {device.type.upper()} has {'' if native else 'no '}native bfloat16"
        notes.append(f"kdad: precision {cfg.train.precision}, chosen: {where}")
    return notes


def _warn(run: _Run, steps: int, new: bool) -> None:
    """Warnings before training: phases too short to learn, images squashed out of shape,
    bfloat16 asked of a device that would emulate it."""
    if not run.r.main:
        return
    for message in phase_warnings(run.cfg.model.name, run.phases, run.cfg.train.epochs, steps):
        warnings.warn(message, KdadWarning, stacklevel=4)
    multiple = size_multiple(run.model)
    if new and (message := squash_advice(run.ds.samples, run.ds.size, multiple)):
        warnings.warn(message, KdadWarning, stacklevel=4)
    if run.cfg.train.precision == "bf16" and not native_bf16(run.device):
        warnings.warn(
            f"precision bf16: this {run.device.type.upper()} has no native bfloat16 arithmetic, "
            "so training will be slower than fp32, not faster",
            KdadWarning,
            stacklevel=4,
        )


def _fill_cache(run: _Run, say: bool) -> None:
    """The frozen teacher's features of every training image, once, when its inputs (or their
    clean versions) repeat."""
    gb = run.cfg.train.teacher_cache_gb
    if gb <= 0:
        return
    run.cache = build_cache(run.model.teacher, run.ds, run.device, gb * 2**30)
    if say and run.cache is not None:
        tqdm.write(
            f"kdad: teacher features of the {len(run.ds)} training images computed once "
            f"({run.cache.nbytes / 2**20:.0f} MB)",
            file=sys.stderr,
        )


def _train_epoch(run: _Run, epoch: int, bar: tqdm, pace: Pace, say: bool) -> dict[str, Any]:
    """One epoch of optimiser steps in its phase; its history entry (loss, seconds)."""
    t = run.cfg.train
    run.model.phase = phase_at(run.phases, epoch).name
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(t.lr, t.lr_schedule, run.phases, epoch, t.epochs)
    run.ds.set_epoch(epoch, run.model.phase)
    run.net.train()
    tic = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64)  # (loss x images, images) on this rank
    for batch in _loader(run.ds, run.cfg, epoch, run.r):
        batch = {k: _to(v, run.device) for k, v in batch.items()}
        given = None if run.cache is None else run.cache.attach(batch)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=t.precision == "bf16"):
            parts = run.model.loss(batch, run.net(batch["image"], given))
        optimiser_step(run.opt, parts["loss"])
        sums += torch.tensor([parts["loss"].item() * len(batch["image"]), len(batch["image"])])
        bar.update()
        bar.set_postfix(epoch=f"{epoch + 1}/{t.epochs}", loss=f"{parts['loss'].item():.4f}")
        if (message := pace.step()) and say:
            tqdm.write(message, file=sys.stderr)
    if run.r.world > 1:
        torch.distributed.all_reduce(sums)
    return {
        "epoch": epoch + 1,
        "loss": float(sums[0] / sums[1]),
        "seconds": time.perf_counter() - tic,
    }


def _end_epoch(
    run: _Run, epoch: int, entry: dict[str, Any], validate: bool, save: bool, bar: tqdm
) -> bool:
    """Rank 0 after an epoch: validate when asked and keep the best, write the checkpoint
    when due (``save``, a validation, a stop); whether to stop early."""
    t = run.cfg.train
    if run.val is not None and validate:  # before the state is taken: it changes the model
        fit_normal(run.model, run.val.good(), t.batch_size)
    state = {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "epoch": epoch + 1,
        "calibration": None,
        "holdout": run.holdout,
    }
    if run.val is not None and validate:
        _validate(run, entry, state, bar)
    run.history.append(entry)
    stop = broadcast(should_stop(run.history, run.best, t.patience))
    if stop:
        entry["stopped_early"] = True
    if not (save or validate or stop):
        return False
    save_checkpoint(
        run.out / "checkpoint.pt",
        {
            **state,
            "history": run.history,
            "best": run.best,
            "optimizer": run.opt.state_dict(),
            "random": random_state(run.device),
        },
    )
    return stop


def _validate(run: _Run, entry: dict[str, Any], state: dict[str, Any], bar: tqdm) -> None:
    """Score the validation set into ``entry`` (the model has fitted its good images),
    calibrate on its good images into ``state``, and write best.pt when this epoch beats the
    best so far."""
    t, c = run.cfg.train, run.cfg.calibration
    ev = evaluate_model(run.model, run.val, t.batch_size)
    entry["val"] = ev.metrics()
    good = ev.labels == 0  # the held-out good images as they are
    state["calibration"] = calibrate(
        ev.scores[good], ev.maps[good], c.false_alarm_rate, c.pixel_quantile
    )
    value = entry["val"][t.select]
    if value is not None and (run.best is None or value > run.best["value"]):
        run.best = {"epoch": entry["epoch"], "metric": t.select, "value": value}
        save_checkpoint(
            run.out / "best.pt", {**state, "history": [*run.history, entry], "best": run.best}
        )
    bar.set_postfix(epoch=f"{entry['epoch']}/{t.epochs}", **{f"val_{t.select}": value})
