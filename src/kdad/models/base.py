"""The model contract every kdad method follows (docs/design.md).

A method is one subclass of ``KDModel`` in one file and one line in ``MODELS``: the base class
builds the frozen teacher and the options; the subclass adds its student, its typed training
output, its loss and, when it needs them, its own training set, its training phases and what it
fits on good images after training.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdad.backbones import get_spec
from kdad.data.dataset import TrainSet
from kdad.errors import KdadError
from kdad.models.teacher import Teacher


class Output(NamedTuple):
    """What a model returns in eval mode."""

    anomaly_map: Tensor  # (B, H, W) at input resolution, higher = more anomalous
    score: Tensor  # (B,) image anomaly score


# learning-rate schedules (engine.schedule.learning_rate): constant, or cosine to ~0 by each
# phase's end
LR_SCHEDULES = ("constant", "cosine")


class Phase(NamedTuple):
    """A stretch of training from epoch ``start`` (0-based) to the next phase's start."""

    name: str  # the model's ``phase`` while it runs: what trains
    start: int
    scoring: bool = True  # eval output is the model's own: validation, calibration, best.pt count
    min_steps: int = 0  # optimiser steps below which the phase learns too little (a warning)
    lr_schedule: str | None = None  # one of LR_SCHEDULES; None: the run's (train.lr_schedule)


class KDModel(nn.Module):
    """A teacher-student detector: train mode returns what ``loss`` needs (a NamedTuple), eval
    mode ``Output``.

    Subclasses set ``Options`` to a dataclass of their own settings (``cfg.model.options``);
    fields whose metadata has ``path=True`` name files, made absolute when a run starts.
    """

    Options: type = object
    phase: str = ""  # the current phase's name, set by the training loop before every epoch
    deep: bool = False  # default stages: the backbone's deep ones (to stride 32), else 4-16

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        stages: list[str] | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        options: Any = None,
    ) -> None:
        super().__init__()
        self.opt = options or self.Options()
        self.teacher = Teacher(
            backbone, stages or self.default_stages(backbone), pretrained, weights
        )

    @classmethod
    def default_stages(cls, backbone: str) -> list[str]:
        """The teacher stages the model uses when none are named."""
        spec = get_spec(backbone)
        return list(spec.deep_stages if cls.deep else spec.default_stages)

    def teach(self, x: Tensor, given: list[Tensor] | None = None) -> list[Tensor]:
        """The frozen teacher's features of ``x`` (B, 3, H, W), shallowest first, without
        gradients: ``given``, the features of this very batch that the training loop looked up
        by its images' indices (engine/teacher_cache.py), or else computed."""
        if given is None:
            with torch.no_grad():
                return self.teacher(x)
        if any(f.shape[0] != x.shape[0] for f in given):
            sizes = sorted({f.shape[0] for f in given})
            raise KdadError(f"teacher features of {sizes} images given for a batch of {len(x)}")
        return given

    @property
    def score_rule(self) -> str:
        """How the image score comes from the map, for results tables."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor], out: Any) -> dict[str, Tensor]:
        """``{"loss": total, **named parts to log}`` for a training batch."""
        raise NotImplementedError

    def train_set(self, images: TrainSet, folder: Path, progress: bool) -> TrainSet:
        """What the model trains on, given the good training images (in their training views):
        by default those images. What it makes to train on, it makes in the run's ``folder``
        and reuses from there when the run resumes (saying what it does when ``progress``)."""
        return images

    def fit_normal(self, images: Iterable[Tensor]) -> None:
        """Fit what the model estimates from good images once trained: called in eval mode
        without gradients on the held-out good training images (never test images), before
        each validation and calibration, with batches (B, 3, H, W). By default nothing."""

    def schedule_steps(self, steps: int) -> int:
        """The optimiser steps of an automatic schedule, given the family's ``steps``: those,
        unless the model's phases need more."""
        return steps

    def phases(self, epochs: int) -> list[Phase]:
        """The training phases of a run of ``epochs``, in order: by default one."""
        return [Phase("train", 0)]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: everything but the frozen ``teacher``, in one group."""
        return [{"params": [p for n, p in self.named_parameters() if not n.startswith("teacher.")]}]
