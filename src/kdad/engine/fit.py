"""The training loop: seeded, one progress bar with loss and ETA, a checkpoint every epoch,
and resume that reproduces an unbroken run exactly.

Under torchrun it is data-parallel: DistributedDataParallel over the trainable parts,
BatchNorm over the global batch, each rank a DistributedSampler shard of every global batch
(``train.batch_size`` is the global batch), and rank 0 alone validating, logging, showing
progress and writing checkpoints."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from kdad.backbones import get_spec
from kdad.config import DataConfig, RunConfig, save_config
from kdad.data.dataset import (
    SyntheticTrainSet,
    SyntheticValidationSet,
    TrainSet,
    input_hw,
    read_bank,
    squash_advice,
)
from kdad.data.layouts import KdadWarning, Sample, find_samples, split_holdout
from kdad.engine.calibrate import calibrate
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint
from kdad.engine.distributed import Rank, broadcast, current, ensure_group, sync_batchnorm
from kdad.engine.evaluate import evaluate_model
from kdad.engine.lock import run_lock
from kdad.engine.schedule import (
    Pace,
    plan_message,
    should_stop,
    stop_message,
    validation_interval,
)
from kdad.engine.teacher_cache import build_cache, teacher_eligible
from kdad.errors import KdadError
from kdad.metrics import METRIC_NAMES
from kdad.models import MODELS, KDModel, build_model


def resolve_device(name: str) -> torch.device:
    """ "auto" is a CUDA GPU when there is one (the rank's own under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", current().local)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise KdadError(f"unknown device {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdadError(f"device {name!r} asked for, but no CUDA GPU is available")
    return dev


def model_from_config(cfg: RunConfig, pretrained: bool = True) -> KDModel:
    """The configured model; ``pretrained=False`` skips teacher weights (a checkpoint has them)."""
    m = cfg.model
    return build_model(m.name, m.backbone, m.stages, m.options, pretrained, m.weights)


def check_input_size(model: KDModel, hw: tuple[int, int], device: torch.device) -> None:
    """One eval pass at the input size, so that feature maps which do not line up at this size
    are a clear error before training, not a shape mismatch inside it."""
    strides = getattr(getattr(model, "teacher", None), "strides", [32])
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
            f"{2 * max(strides)}"
        ) from e


def training_samples(d: DataConfig) -> tuple[list[Sample], list[Sample]]:
    """The good training images: (those a model fits on, those held out to calibrate)."""
    samples = find_samples(
        d.path, "train", d.layout, d.category, d.normal_dir, d.abnormal_dir, d.mask_dir
    )
    return split_holdout(samples, d.holdout)


def datasets(cfg: RunConfig) -> tuple[TrainSet, SyntheticValidationSet | None]:
    """The good training images of ``cfg.data`` to fit, and the validation set made from the
    held-out fraction (``data.holdout``) with synthetic defects; None when nothing is held out."""
    d = cfg.data
    fit_samples, held = training_samples(d)
    spec = get_spec(cfg.model.backbone)
    cls = MODELS.get(cfg.model.name)
    if cls is not None and cls.needs_synthetic:
        opt = cls.Options(**cfg.model.options)
        bank = read_bank(opt.ddpm_samples, fit_samples) if opt.defects == "ddpm" else None
        train = SyntheticTrainSet(
            fit_samples,
            d.image_size,
            spec.mean,
            spec.std,
            cfg.train.seed,
            d.augment,
            opt.defect_prob,
            bank,
        )
    else:
        train = TrainSet(fit_samples, d.image_size, spec.mean, spec.std, cfg.train.seed, d.augment)
    val = SyntheticValidationSet(held, d.image_size, spec.mean, spec.std) if held else None
    return train, val


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


def fit(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg`` into ``cfg.out``; returns the checkpoint to use: ``best.pt`` (the epoch
    scoring best on the synthetic validation set) when images were held out, else
    ``checkpoint.pt`` (the last epoch, also the one that ``resume`` continues).

    An existing run folder is never overwritten: continue it with ``resume=True`` (its saved
    config wins, except that ``train.epochs`` may be raised) or choose another ``out``. While
    training, the folder is locked (rank 0 holds it): a second process is refused.
    """
    if not current().main:
        return _fit(cfg, resume, progress)
    with run_lock(Path(cfg.out)):
        return _fit(cfg, resume, progress)


def _fit(cfg: RunConfig, resume: bool, progress: bool) -> Path:
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise KdadError(f"{ckpt_path}: nothing to resume")
        state = load_checkpoint(ckpt_path)
        epochs = cfg.train.epochs
        cfg = RunConfig.from_dict(state["config"], str(ckpt_path))
        cfg.train.epochs = max(epochs, cfg.train.epochs)
    elif ckpt_path.exists():
        raise KdadError(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 1 or t.val_every < 0 or t.patience < 0:
        raise KdadError(
            "epochs and batch size must be at least 1, val_every and patience at least 0"
        )
    if t.select not in METRIC_NAMES:
        raise KdadError(f"select must be a metric: one of {', '.join(METRIC_NAMES)}")
    input_hw(cfg.data.image_size)
    if cfg.data.path:  # absolute, so the run can be tested and resumed from anywhere
        cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.model.options.get("ddpm_samples"):  # likewise the synthetic defects' folder
        cfg.model.options["ddpm_samples"] = str(Path(cfg.model.options["ddpm_samples"]).resolve())
    device = resolve_device(t.device)
    r = ensure_group(device)
    if t.batch_size % r.world:
        raise KdadError(f"batch size {t.batch_size} is not divisible by the {r.world} ranks")
    if r.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    torch.manual_seed(t.seed)
    ds, val = datasets(cfg)
    # channels-last: about 1.5x faster training steps on CPU (measured on the RD family)
    model = model_from_config(cfg, pretrained=state is None).to(
        device, memory_format=torch.channels_last
    )
    if state is not None:
        model.load_state_dict(state["model"])
    check_input_size(model, ds.size, device)
    net = model  # what runs the training forward pass
    if r.world > 1:
        model = sync_batchnorm(model, device)
        # some parameters sit out some steps (DeST-DDPM's two phases)
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
    holdout = [str(s.path) for s in val.samples] if val else []

    steps = len(_loader(ds, cfg, 0, r))
    every = validation_interval(t.val_every, steps)
    if r.main and (message := model.budget_warning(steps, t.epochs)):
        warnings.warn(message, KdadWarning, stacklevel=2)
    if r.main and not state and (message := squash_advice(ds.samples, ds.size)):
        warnings.warn(message, KdadWarning, stacklevel=2)
    say = progress and r.main
    if say:
        held = len(val.samples) if val else 0
        plan = (cfg.model.name, len(ds), held, t.epochs, steps, every, t.patience, t.select)
        tqdm.write(plan_message(*plan), file=sys.stderr)
    # a resumed run that had already stopped early trains no further
    last = start if should_stop(history, best, t.patience) else t.epochs
    cache, teacher = None, getattr(model, "teacher", None)
    wanted = last > start and t.teacher_cache_gb > 0 and teacher_eligible(ds, model)
    if teacher is not None and wanted:
        cache = build_cache(teacher, ds, device, t.teacher_cache_gb * 2**30)
        teacher.cache = cache
        if say and cache is not None:
            tqdm.write(
                f"kdad: teacher features of the {len(ds)} training images computed once "
                f"({cache.nbytes / 2**20:.0f} MB)",
                file=sys.stderr,
            )
    pace = Pace(steps, t.epochs * steps - start * steps)
    bar = tqdm(
        total=t.epochs * steps,
        initial=start * steps,
        disable=not (progress and r.main),
        unit="step",
        dynamic_ncols=True,
    )
    for epoch in range(start, last):
        model.start_epoch(epoch, t.epochs)
        ds.set_epoch(epoch)
        net.train()
        tic = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64)  # (loss x images, images) on this rank
        for batch in _loader(ds, cfg, epoch, r):
            batch = {k: _to(v, device) for k, v in batch.items()}
            if cache is not None:
                cache.give(batch["index"])
            parts = model.loss(batch, net(batch["image"]))
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            sums += torch.tensor([parts["loss"].item() * len(batch["image"]), len(batch["image"])])
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{t.epochs}", loss=f"{parts['loss'].item():.4f}")
            if (message := pace.step()) and say:
                tqdm.write(message, file=sys.stderr)
        if r.world > 1:
            torch.distributed.all_reduce(sums)
        entry = {
            "epoch": epoch + 1,
            "loss": float(sums[0] / sums[1]),
            "seconds": time.perf_counter() - tic,
        }
        if not r.main:
            if broadcast(False):  # rank 0's decision to stop early
                break
            continue
        state = {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "epoch": epoch + 1,
            "calibration": None,
            "holdout": holdout,
        }
        due = (epoch + 1) % every == 0 or epoch + 1 == t.epochs
        if val is not None and due and model.scoring:
            ev = evaluate_model(model, val, t.batch_size)
            entry["val"] = ev.metrics()
            good = ev.labels == 0  # the held-out good images as they are
            c = cfg.calibration
            state["calibration"] = calibrate(
                ev.scores[good], ev.maps[good], c.false_alarm_rate, c.pixel_quantile
            )
            value = entry["val"][t.select]
            if value is not None and (best is None or value > best["value"]):
                best = {"epoch": epoch + 1, "metric": t.select, "value": value}
                save_checkpoint(
                    out / "best.pt", {**state, "history": [*history, entry], "best": best}
                )
            bar.set_postfix(epoch=f"{epoch + 1}/{t.epochs}", **{f"val_{t.select}": value})
        history.append(entry)
        stop = broadcast(should_stop(history, best, t.patience))
        if stop:
            entry["stopped_early"] = True
        save_checkpoint(
            ckpt_path, {**state, "history": history, "best": best, "optimizer": opt.state_dict()}
        )
        if stop:
            if say:
                tqdm.write(stop_message(epoch + 1, history, best), file=sys.stderr)
            break
    bar.close()
    return broadcast(out / "best.pt" if best else ckpt_path)
