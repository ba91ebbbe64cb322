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
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from kdad.config import DataConfig, DDPMOptions, DiffusionConfig, PaintConfig
from kdad.data.dataset import resize_image
from kdad.data.io import read_image
from kdad.data.layouts import Sample, training_samples
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint
from kdad.engine.distributed import resolve_device
from kdad.engine.loop import optimiser_step, progress_bar, random_state, restore_random_state
from kdad.errors import KdadError
from kdad.files import atomic_write
from kdad.synth.ddpm import DDPM
from kdad.synth.perlin import perlin_mask


def _load(path: Path, size: int, channels: int) -> torch.Tensor:
    """An image as (channels, size, size) in [-1, 1] (gray: the mean of its channels)."""
    x = resize_image(torch.from_numpy(read_image(path)).permute(2, 0, 1), size)
    x = x.mean(0, keepdim=True) if channels == 1 else x
    return x * 2 - 1


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
    training images of ``cfg.data``; never overwrites a finished one. Every ``save_every``
    steps the training state goes to ddpm.partial.pt, from which an interrupted training with
    the same settings resumes (on a CPU, to the weights an unbroken one gives)."""
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
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = DDPM(cfg.ddpm).to(device)
    images = torch.stack([_load(s.path, cfg.ddpm.image_size, cfg.ddpm.channels) for s in samples])
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
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        x = images[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
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
    model = DDPM(DDPMOptions(**state["config"]["ddpm"]))
    model.load_state_dict(state["model"])
    return model.eval(), state["config"]


_REDRAWS = 10


def paint_changed(
    model: DDPM,
    x0: Tensor,
    rng: np.random.Generator,
    gen: torch.Generator,
    strength: float,
    sigma: float,
    steps: int,
    min_change: float,
) -> tuple[Tensor, Tensor]:
    """Paint Perlin regions of (B, C, S, S) images in [-1, 1]: (painted, masks (B, 1, S, S)),
    each mask the region's pixels that changed by more than ``min_change`` and never empty."""
    size = x0.shape[-1]
    painted, masks = x0.clone(), torch.zeros(len(x0), 1, size, size)
    todo = torch.arange(len(x0))
    for _ in range(_REDRAWS):
        region = torch.from_numpy(np.stack([perlin_mask((size, size), rng) for _ in todo]))[:, None]
        out = model.paint(x0[todo], region.float(), strength, sigma, steps, gen)
        changed = region & ((out - x0[todo]).abs().amax(1, keepdim=True) / 2 > min_change)
        painted[todo], masks[todo] = out, changed.float()
        todo = todo[changed.flatten(1).sum(1) == 0]
        if not len(todo):
            return painted, masks
    raise KdadError(
        f"painting changed no pixel by more than {min_change:.3f} in {_REDRAWS} Perlin regions "
        "of one image: raise --sigma or lower --strength"
    )


def sample_defects(
    model_path: str | Path,
    out: str | Path,
    paint: PaintConfig,
    data: str | None = None,
    progress: bool = True,
    samples: list[Sample] | None = None,
) -> Path:
    """Paint ``paint.count`` defects on good training images (``samples``, by default those of
    the DDPM's data, or of ``data``; cycled in a seeded order) and write
    them at each source's resolution: ``out``/test/ddpm/NNNN.png, ``out``/ground_truth/ddpm/
    NNNN_mask.png and ``out``/synthetic.csv (image, mask, source), written last.

    A defect's mask is the part of its Perlin region that painting changed by more than
    ``paint.min_change`` (of the value range): a DDPM of a few images repaints much of a region
    as it was (saturated or black background, memorised content), and labelling that as defect would
    teach a segmentation head noise. Only the masked pixels are pasted; a region left wholly
    unchanged is drawn again (at most ``_REDRAWS`` times).
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
    size, ch = model.opt.image_size, model.opt.channels
    rows = []
    for start in tqdm(range(0, p.count, p.batch_size), disable=not progress, unit="batch"):
        idx = [int(order[i % len(order)]) for i in range(start, min(start + p.batch_size, p.count))]
        x0 = torch.stack([_load(samples[i].path, size, ch) for i in idx])  # (B, ch, S, S)
        painted, masks = paint_changed(
            model, x0, rng, gen, p.strength, p.sigma, p.steps, p.min_change
        )
        for k, i in enumerate(idx):
            n = start + k
            src = read_image(samples[i].path)  # (H, W, 3) original resolution
            h, w = src.shape[:2]
            up = F.interpolate(
                torch.cat([painted[k : k + 1] * 0.5 + 0.5, masks[k : k + 1]], 1),
                size=(h, w),
                mode="bilinear",
            )[0]
            region = up[-1].numpy() > 0.5  # (H, W)
            paint = up[:-1].clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, ch)
            img = np.where(region[..., None], np.broadcast_to(paint, src.shape), src)
            name = f"{n:04d}"
            Image.fromarray((img * 255).round().astype(np.uint8)).save(
                out / "test" / "ddpm" / f"{name}.png"
            )
            Image.fromarray(region.astype(np.uint8) * 255).save(
                out / "ground_truth" / "ddpm" / f"{name}_mask.png"
            )
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
    folder: Path,
    steps: int,
    count: int,
    seed: int,
    device: str,
    progress: bool = True,
) -> Path:
    """A defect bank of ``samples`` made in ``folder``: a DDPM of them trained for ``steps``
    into ``folder``/ddpm (kept once finished), then ``count`` defects painted with it into
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
            cfg = DiffusionConfig(
                ddpm=DDPMOptions(channels=0), steps=steps, seed=seed, device=device, out=str(ddpm)
            )
            train_ddpm(cfg, progress, samples)
        if progress:
            tqdm.write(f"kdad: painting {count} defects into {bank}", file=sys.stderr)
        paint = PaintConfig(count=count, seed=seed)
        sample_defects(ddpm, bank, paint, progress=progress, samples=samples)
    return bank
