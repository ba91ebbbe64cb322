"""The model contract every kdad method follows (see DESIGN.md)."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn


class Output(NamedTuple):
    """What a model returns in eval mode."""

    anomaly_map: Tensor  # (B, H, W) at input resolution, higher = more anomalous
    score: Tensor  # (B,) image anomaly score


class KDModel(nn.Module):
    """A teacher-student detector: train mode returns what ``loss`` needs, eval mode ``Output``.

    Subclasses set ``Options`` to a dataclass of their own settings (``cfg.model.options``).
    """

    Options: type = object
    needs_synthetic: bool = False  # the dataset adds synthetic defects and masks when True
    score_rule: str = ""  # how the image score comes from the map, for results tables

    def loss(self, batch: dict[str, Tensor], out: Any) -> dict[str, Tensor]:
        """``{"loss": total, **named parts to log}`` for a training batch."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before each epoch (0-based): for phased training."""

    @property
    def scoring(self) -> bool:
        """Whether eval output is already the model's own (a phased model's scoring part may
        not have trained yet): validation, calibration and best.pt only count such epochs."""
        return True

    def budget_warning(self, steps_per_epoch: int, epochs: int) -> str | None:
        """A warning when ``epochs`` of ``steps_per_epoch`` optimiser steps are too few for
        this model to learn, else None."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: everything but the frozen ``teacher``, in one group."""
        return [{"params": [p for n, p in self.named_parameters() if not n.startswith("teacher.")]}]
