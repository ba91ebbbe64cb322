"""The training schedule sized for a CPU: how often to validate, when to stop, and what to
tell the user about it (the plan at the start, the expected time after a few steps)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdad.models import Phase

VAL_STEPS = 40  # automatic cadence: validations at least this many optimiser steps apart
# train.epochs: auto trains this many optimiser steps (batch 16), whatever the set's size: on
# Magnetic Tile (43 steps an epoch) and battery-weld (2) test metrics still rose to about here,
# while the synthetic validation had flattened long before (docs/benchmarks.md, issue 29)
STEPS = 2400


def checkpoint_interval(steps_per_epoch: int) -> int:
    """Epochs between checkpoints: every epoch when an epoch has ``VAL_STEPS`` steps or more,
    else as many epochs as make ``VAL_STEPS`` steps (a set of two steps an epoch: every 20)."""
    return max(1, math.ceil(VAL_STEPS / max(steps_per_epoch, 1)))


def validation_interval(val_every: int, steps_per_epoch: int, epochs: int, patience: int) -> int:
    """Epochs between validations: ``val_every`` when set; else (0) once, at the end, for a
    fixed schedule (``patience`` 0: nothing to stop and the last epoch is kept), or, for early
    stopping, as often as checkpoints (patience then means the same work on any set)."""
    if val_every:
        return val_every
    return epochs if patience == 0 else checkpoint_interval(steps_per_epoch)


def auto_epochs(steps_per_epoch: int, total: int = STEPS) -> int:
    """``train.epochs: auto``: the epochs that make about ``total`` optimiser steps (``STEPS``,
    or what a model makes of them: ``KDModel.schedule_steps``)."""
    return max(1, round(total / max(steps_per_epoch, 1)))


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that epoch ``epoch`` (0-based) belongs to: the last one started by then."""
    return [p for p in phases if p.start <= epoch][-1]


def learning_rate(lr: float, schedule: str, phases: list[Phase], epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under its phase's schedule (the run's
    ``schedule`` unless the phase has its own): ``lr`` throughout (constant), or decayed from
    ``lr`` along half a cosine over the phase, so that it ends near zero (cosine; for a fixed
    number of epochs: with early stopping the decay is cut short)."""
    phase = phase_at(phases, epoch)
    if (phase.lr_schedule or schedule) == "constant":
        return lr
    end = min([p.start for p in phases if p.start > phase.start] + [epochs])
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - phase.start) / (end - phase.start)))


def phase_warnings(model: str, phases: list[Phase], epochs: int, steps: int) -> list[str]:
    """A warning for each phase that gets fewer optimiser steps than it needs to learn, in a
    run of ``epochs`` of ``steps`` steps each."""
    ends = [p.start for p in phases[1:]] + [epochs]
    out = []
    for p, end in zip(phases, ends):
        got = max(0, min(end, epochs) - p.start) * steps
        if got < p.min_steps:
            out.append(
                f"{model}: the {p.name} gets {got} optimiser steps ({steps} a epoch); it needs "
                f"about {p.min_steps}: raise --epochs"
            )
    return out


def stale_validations(history: list[dict[str, Any]], best: dict[str, Any] | None) -> int:
    """Validations since the best one (all of them when none has been best yet)."""
    since = best["epoch"] if best else 0
    return sum(1 for e in history if "val" in e and e["epoch"] > since)


def should_stop(history: list[dict[str, Any]], best: dict[str, Any] | None, patience: int) -> bool:
    """True once ``patience`` validations in a row have not beaten the best (never when 0)."""
    return patience > 0 and stale_validations(history, best) >= patience


def stop_message(epoch: int, history: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """Why training ended at ``epoch``."""
    text = f"kdad: stopped early after epoch {epoch}: {stale_validations(history, best)} "
    if best is None:
        return text + "validations, none scored"
    return text + (
        f"validations without a better {best['metric']} (best {best['value']:.4f} at epoch "
        f"{best['epoch']}, kept as best.pt)"
    )


def duration(seconds: float) -> str:
    """``3h05m``, ``12m40s`` or ``45s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def plan_message(
    model: str,
    images: int,
    held: int,
    epochs: int,
    steps: int,
    every: int,
    patience: int,
    select: str,
) -> str:
    """What a run is about to do, in one line."""
    most = "at most " if patience and held else ""
    text = f"kdad: {model} on {images} images: {most}{epochs} epochs x {steps} steps = "
    text += f"{epochs * steps} steps"
    if not held:
        return text + "; no held-out images: no validation, no early stopping"
    when = "at the end" if every >= epochs else f"every {every} epoch{'s' * (every > 1)}"
    text += f"; validation on {held} held-out images {when}"
    if patience:
        text += f", stopping after {patience} without a better {select}"
    return text


def eta_message(
    seconds_per_step: float, steps_left: int, steps_per_epoch: int, early: bool = False
) -> str:
    """The expected time, from the pace measured so far (``early``: a run that may stop early)."""
    text = (
        f"kdad: {seconds_per_step:.2f} s a step, {duration(seconds_per_step * steps_per_epoch)} "
        f"an epoch: {'at most ' * early}{duration(seconds_per_step * steps_left)} more, "
        "plus validations"
    )
    return text + " (early stopping usually ends sooner)" * early


class Pace:
    """Times the optimiser steps and, once ``WARMUP + MEASURED`` have run, says once how long
    the rest should take (the first steps are slower: allocation, caches)."""

    WARMUP, MEASURED = 1, 5

    def __init__(self, steps_per_epoch: int, steps_left: int, early: bool = False) -> None:
        self.per_epoch, self.left, self.done, self.early = steps_per_epoch, steps_left, 0, early
        self.tic = time.perf_counter()

    def step(self) -> str | None:
        """Count one step; the expected-time line when it is due, else None."""
        self.done += 1
        if self.done == self.WARMUP:
            self.tic = time.perf_counter()
        if self.done != self.WARMUP + self.MEASURED:
            return None
        pace = (time.perf_counter() - self.tic) / self.MEASURED
        return eta_message(pace, self.left - self.done, self.per_epoch, self.early)
