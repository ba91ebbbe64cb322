"""``kdad synth``: train a DDPM on a dataset's good training images, then paint synthetic
defects with it into an MVTec-layout folder (images, masks, and synthetic.csv naming each
defect's clean source) that DeST-DDPM can train from (``bank.synthetic_gallery`` shows them)."""

from __future__ import annotations

import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from kdad.config import DataConfig, DDPMOptions, DiffusionConfig, PaintConfig
from kdad.data.dataset import AUTO, choose_size, input_hw, resize_image
from kdad.data.io import read_image
from kdad.data.layouts import Sample, training_samples
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint
from kdad.engine.distributed import native_bf16, resolve_device
from kdad.engine.loop import optimiser_step, progress_bar, random_state, restore_random_state
from kdad.errors import KdadError
from kdad.files import atomic_write
from kdad.synth.ddpm import DDPM, blur
from kdad.synth.perlin import perlin_mask


def _load(path: Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    """An image as (channels, H, W) of ``size`` in [-1, 1] (gray: the mean of its channels)."""
    x = resize_image(torch.from_numpy(read_image(path)).permute(2, 0, 1), size)
    x = x.mean(0, keepdim=True) if channels == 1 else x
    return x * 2 - 1


# the detector's side multiple (engine.fit.size_multiple) for an ``auto`` size: the DDPM paints at
# the size the detector will read its defects
_SIZE_MULTIPLE = 32


def _crops(images: Tensor, crop: int, count: int, g: torch.Generator) -> Tensor:
    """``count`` random ``crop``-square crops of random ``images`` (N, C, H, W) uint8, each
    flipped left-right at random: (count, C, crop, crop) in [-1, 1]."""
    n, _, h, w = images.shape
    idx = torch.randint(n, (count,), generator=g).tolist()
    top = torch.randint(h - crop + 1, (count,), generator=g).tolist()
    left = torch.randint(w - crop + 1, (count,), generator=g).tolist()
    flip = (torch.rand(count, generator=g) < 0.5).tolist()
    out = [images[i, :, y : y + crop, x : x + crop] for i, y, x in zip(idx, top, left)]
    out = [c.flip(-1) if f else c for c, f in zip(out, flip)]
    return torch.stack(out).float() / 127.5 - 1


def _is_gray(paths: list[Path]) -> bool:
    return all(np.ptp(read_image(p), axis=2).max() < 1e-6 for p in paths)


def _resume(partial: Path, cfg: DiffusionConfig) -> dict[str, Any] | None:
    """The interrupted training saved at ``partial`` if it has ``cfg``'s settings; an error
    naming the file if it has others (never silently restarted or mixed)."""
    if not partial.is_file():
        return None
    state = load_checkpoint(partial)
    if "random" not in state:
        raise KdadError(f"{partial}: an interrupted DDPM training of an older kdad; remove it")
    if state.get("config") != dataclasses.asdict(cfg):
        raise KdadError(
            f"{partial}: an interrupted DDPM training with other settings; remove it or choose "
            "another --out"
        )
    return state


def train_ddpm(
    cfg: DiffusionConfig, progress: bool = True, samples: list[Sample] | None = None
) -> Path:
    """Train the DDPM of ``cfg`` into ``cfg.out``/ddpm.pt on ``samples``, by default the good
    training images of ``cfg.data``, on random crops of them at ``cfg.data.image_size`` (the
    detector's input size; ``auto`` chooses it as training does); never overwrites a finished
    one. Every ``save_every`` steps the training state goes to ddpm.partial.pt, from which an
    interrupted training with the same settings resumes (on a CPU, to the weights an unbroken
    one gives)."""
    out = Path(cfg.out)
    ckpt, partial = out / "ddpm.pt", out / "ddpm.partial.pt"
    if ckpt.exists():
        raise KdadError(f"{ckpt} exists: choose another --out")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.save_every < 1:
        raise KdadError("steps, batch size and save_every must be at least 1")
    if cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).resolve())
    samples = samples if samples is not None else training_samples(cfg.data)[0]
    if cfg.ddpm.channels not in (0, 1, 3):
        raise KdadError(f"channels must be 0 (auto), 1 or 3, got {cfg.ddpm.channels}")
    if cfg.ddpm.channels == 0:
        cfg.ddpm.channels = 1 if _is_gray([s.path for s in samples[:16]]) else 3
    if cfg.data.image_size == AUTO:
        cfg.data.image_size = choose_size(samples, _SIZE_MULTIPLE)[0]
    hw = input_hw(cfg.data.image_size)
    if min(hw) < cfg.ddpm.crop:
        raise KdadError(f"image size {hw[0]}x{hw[1]} is smaller than the crop {cfg.ddpm.crop}")
    device = resolve_device(cfg.device)
    if cfg.precision == AUTO:
        cfg.precision = "bf16" if native_bf16(device) else "fp32"
    if cfg.precision not in ("fp32", "bf16"):
        raise KdadError(f"precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    torch.manual_seed(cfg.seed)
    model = DDPM(cfg.ddpm).to(device)
    images = torch.stack(  # (N, C, H, W) uint8: a crop is drawn from these at each step
        [((_load(s.path, hw, cfg.ddpm.channels) + 1) * 127.5).round().byte() for s in samples]
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    step, losses, spent = 0, [], 0.0
    if (state := _resume(partial, cfg)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_random_state(state["random"], device, g)
        step, losses, spent = state["step"], state["losses"], state["seconds"]
        if progress:
            say = f"kdad: resuming the DDPM training in {partial} at step {step}"
            tqdm.write(say, file=sys.stderr)
    tic = time.perf_counter()

    def save(path: Path, final: bool) -> None:
        state = {
            "config": dataclasses.asdict(cfg),
            "model": model.state_dict(),
            "images": len(images),
            "seconds": spent + time.perf_counter() - tic,
        }
        if final:
            state["loss_last_100"] = float(np.mean(losses[-100:]))
        else:
            state |= {"optimizer": opt.state_dict(), "step": step, "losses": losses}
            state["random"] = random_state(device, g)
        save_checkpoint(path, state)

    out.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(cfg.steps, step, progress)
    while step < cfg.steps:
        x = _crops(images, cfg.ddpm.crop, cfg.batch_size, g).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = model.loss(x)
        optimiser_step(opt, loss)
        losses.append(loss.item())
        step += 1
        bar.update()
        if step % cfg.save_every == 0 and step < cfg.steps:
            save(partial, final=False)
    bar.close()
    save(ckpt, final=True)
    partial.unlink(missing_ok=True)
    return ckpt


def load_ddpm(path: str | Path) -> tuple[DDPM, dict[str, Any]]:
    """A trained DDPM (its checkpoint file or run folder) and its saved config."""
    path = Path(path)
    path = path / "ddpm.pt" if path.is_dir() else path
    state = load_checkpoint(path)
    if "config" not in state or "ddpm" not in state["config"]:
        raise KdadError(f"{path}: not a DDPM checkpoint from `kdad synth train`")
    if "crop" not in state["config"]["ddpm"]:
        raise KdadError(
            f"{path}: a DDPM of whole 64x64 images from an older kdad, which paints blurred "
            "defects; train a new one with `kdad synth train`"
        )
    model = DDPM(DDPMOptions(**state["config"]["ddpm"]))
    model.load_state_dict(state["model"])
    return model.eval(), state["config"]


_REDRAWS = 10


def defect_mask(out: Tensor, x0: Tensor, region: Tensor, paint: PaintConfig) -> Tensor:
    """The defect's label: the pixels of ``region`` (B, 1, H, W) bool where painting ``x0`` into
    ``out`` (B, C, H, W) in [-1, 1] changed the value, smoothed over ``paint.mask_sigma``
    pixels, by more than ``paint.min_change`` of the range."""
    change = (out - x0).abs().amax(1, keepdim=True) / 2  # (B, 1, H, W) in [0, 1]
    change = blur(change, paint.mask_sigma) if paint.mask_sigma > 0 else change
    return region & (change > paint.min_change)


def visibility(out: Tensor, x0: Tensor, mask: Tensor) -> Tensor:
    """How far a painted defect stands out of the part's own pattern, per image (B,): the mean
    |change| blurred over 2 px, over the mean |source blurred over 2 px - blurred over 8 px| (the
    part's structure at that scale), both over ``mask`` (B, 1, H, W) bool; images (B, C, H, W)."""
    gray_out, gray_src = out.mean(1, keepdim=True), x0.mean(1, keepdim=True)
    change = blur(gray_out - gray_src, 2).abs()
    structure = (blur(gray_src, 2) - blur(gray_src, 8)).abs()
    m = mask.float()
    area = m.flatten(1).sum(1).clamp_min(1)
    mean_change = (change * m).flatten(1).sum(1) / area
    return mean_change / ((structure * m).flatten(1).sum(1) / area).clamp_min(1e-6)


def paint_changed(
    model: DDPM, x0: Tensor, rng: np.random.Generator, gen: torch.Generator, paint: PaintConfig
) -> tuple[Tensor, Tensor]:
    """Paint Perlin regions of (B, C, H, W) images in [-1, 1]: (painted, masks (B, 1, H, W)),
    each mask the region's pixels whose change, smoothed over ``paint.mask_sigma`` pixels,
    exceeds ``paint.min_change`` of the value range; never empty. Only masked pixels keep their
    paint, so the mask is exactly what differs from the source. A defect that does not stand
    ``paint.min_visibility`` times out of the part's own pattern (``visibility``) is drawn
    again; after ``_REDRAWS`` draws the most visible one is kept."""
    p, hw = paint, tuple(x0.shape[-2:])
    device = torch.device("cpu")
    bf16 = p.precision == "bf16" or (p.precision == AUTO and native_bf16(device))
    painted, masks = x0.clone(), torch.zeros(len(x0), 1, *hw)
    best = torch.full((len(x0),), -1.0)  # visibility of each image's kept draw; -1: none yet
    todo = torch.arange(len(x0))
    for _ in range(_REDRAWS):
        region = torch.from_numpy(np.stack([perlin_mask(hw, rng) for _ in todo]))[:, None]
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model.paint(x0[todo], region.float(), p.strength, p.sigma, p.grain, p.steps, gen)
        out = out.float()
        changed = defect_mask(out, x0[todo], region, p)
        seen = visibility(out, x0[todo], changed)
        seen[changed.flatten(1).sum(1) == 0] = -1  # nothing changed: no defect at all
        better = seen > best[todo]
        keep = todo[better]
        painted[keep] = torch.where(changed[better], out[better], x0[keep])  # only the mask's
        masks[keep], best[keep] = changed[better].float(), seen[better]
        todo = todo[best[todo] < p.min_visibility]
        if not len(todo):
            return painted, masks
    if (best < 0).any():
        raise KdadError(
            f"painting changed no pixel by more than {p.min_change:.3f} in {_REDRAWS} Perlin "
            "regions of one image: raise --sigma or lower --strength"
        )
    return painted, masks


def _save_image(x: Tensor, path: Path) -> None:
    """(C, H, W) in [0, 1], C 1 or 3, as an 8-bit PNG."""
    a = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)


def sample_defects(
    model_path: str | Path,
    out: str | Path,
    paint: PaintConfig,
    data: str | None = None,
    progress: bool = True,
    samples: list[Sample] | None = None,
) -> Path:
    """Paint ``paint.count`` defects on good training images (``samples``, by default those of
    the DDPM's data, or of ``data``; cycled in a seeded order) at the size the DDPM learnt
    them (the detector's input size) and write them: ``out``/test/ddpm/NNNN.png,
    ``out``/ground_truth/ddpm/NNNN_mask.png and ``out``/synthetic.csv (image, mask, source),
    written last.

    A defect's mask is the part of its Perlin region that painting changed (``paint_changed``):
    where the DDPM repainted the region as it was, nothing is labelled, so the head is never
    taught that unchanged pixels are defects. A region left wholly unchanged is drawn again (at
    most ``_REDRAWS`` times).
    """
    model, cfg = load_ddpm(model_path)
    if samples is None:
        dc = DataConfig(**cfg["data"])
        dc.path = data or dc.path
        samples = training_samples(dc)[0]
    out = Path(out)
    if (out / "synthetic.csv").exists():
        raise KdadError(f"{out / 'synthetic.csv'} exists: choose another --out")
    (out / "test" / "ddpm").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth" / "ddpm").mkdir(parents=True, exist_ok=True)
    p = paint
    rng = np.random.default_rng(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    order = rng.permutation(len(samples))
    hw, ch = input_hw(cfg["data"]["image_size"]), model.opt.channels
    rows = []
    for start in tqdm(range(0, p.count, p.batch_size), disable=not progress, unit="batch"):
        idx = [int(order[i % len(order)]) for i in range(start, min(start + p.batch_size, p.count))]
        x0 = torch.stack([_load(samples[i].path, hw, ch) for i in idx])  # (B, ch, H, W)
        painted, masks = paint_changed(model, x0, rng, gen, p)
        for k, i in enumerate(idx):
            name = f"{start + k:04d}"
            _save_image(painted[k] * 0.5 + 0.5, out / "test" / "ddpm" / f"{name}.png")
            _save_image(masks[k], out / "ground_truth" / "ddpm" / f"{name}_mask.png")
            rows.append(
                {
                    "image": f"test/ddpm/{name}.png",
                    "mask": f"ground_truth/ddpm/{name}_mask.png",
                    "source": str(samples[i].path.resolve()),
                }
            )

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "mask", "source"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "synthetic.csv", write)
    return out


def paint_bank(
    samples: list[Sample],
    size: tuple[int, int],
    folder: Path,
    steps: int,
    count: int,
    seed: int,
    device: str,
    progress: bool = True,
) -> Path:
    """A defect bank of ``samples`` made in ``folder`` at the detector's input ``size``: a DDPM
    of them trained for ``steps`` into ``folder``/ddpm (kept once finished), then ``count``
    defects painted with it into
    ``folder``/defects (kept once its synthetic.csv is written); what exists is reused, so an
    interrupted or resumed run redoes only what is missing. Returns the bank folder."""
    ddpm, bank = folder / "ddpm", folder / "defects"
    if not (bank / "synthetic.csv").is_file():
        if not (ddpm / "ddpm.pt").is_file():
            if progress:
                tqdm.write(
                    f"kdad: training a DDPM of the {len(samples)} good images ({steps} steps) "
                    f"to paint defects into {bank}",
                    file=sys.stderr,
                )
            opt = DDPMOptions(channels=0)
            step = 2 ** (opt.levels - 1)
            opt.crop = min(opt.crop, min(size) // step * step)  # images smaller than the crop
            cfg = DiffusionConfig(
                data=DataConfig(image_size=list(size)),
                ddpm=opt,
                steps=steps,
                seed=seed,
                device=device,
                out=str(ddpm),
            )
            train_ddpm(cfg, progress, samples)
        if progress:
            tqdm.write(f"kdad: painting {count} defects into {bank}", file=sys.stderr)
        paint = PaintConfig(count=count, seed=seed)
        sample_defects(ddpm, bank, paint, progress=progress, samples=samples)
    return bank
