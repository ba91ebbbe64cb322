"""What every kdad training loop shares, written once: the optimiser step, the random state a
resumed run needs to go on as an unbroken one would, and the progress bar. Checkpoints are
written atomically by ``engine.checkpoint.save_checkpoint``. The model loop (``engine.fit``)
and the DDPM's (``synth.diffusion.train_ddpm``) both train through these."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm


def optimiser_step(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One step on ``loss``: gradients cleared, back-propagated, applied."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def random_state(device: torch.device, *generators: torch.Generator) -> dict[str, Any]:
    """The global torch RNG (and the device's, on CUDA) and each of ``generators``, for a
    checkpoint: restored by ``restore_random_state``."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    state["generators"] = [g.get_state() for g in generators]
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(
    state: dict[str, Any], device: torch.device, *generators: torch.Generator
) -> None:
    """Put back what ``random_state`` saved (the same generators, in the same order)."""
    torch.set_rng_state(state["rng"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """The bar of optimiser steps every training shows (none when not ``enabled``)."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
