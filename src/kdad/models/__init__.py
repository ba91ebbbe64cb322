"""MODELS: every registered method by name, in one explicit dict."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kdad.config import ModelConfig
from kdad.data.dataset import AUTO
from kdad.errors import KdadError
from kdad.models.base import LR_SCHEDULES, KDModel, Output, Phase
from kdad.models.bsdrd import BSDRD
from kdad.models.dest_ddpm import DeSTDDPM
from kdad.models.iig_rd import IIGRD
from kdad.models.rd import RD
from kdad.models.sspcab_kd import SSPCABKD
from kdad.models.stu_seg import STUSeg

MODELS: dict[str, type[KDModel]] = {
    "rd": RD,
    "iig_rd": IIGRD,
    "bsdrd": BSDRD,
    "stu_seg": STUSeg,
    "sspcab_kd": SSPCABKD,
    "dest_ddpm": DeSTDDPM,
}

# model.name auto (the default, engine.choose): the candidate students, in order of preference
# on a tie. STU-Seg at width 16: without skips on strides 4-32, kdad's best on textured tiles
# (its output comes through a stride-32 bottleneck, so a defect cannot be copied through; the
# map leaves out stride 4, where a tile's texture is noise), and with skips on strides 4-16,
# its best on welds (sharper maps); docs/benchmarks.md, issue 29.
CANDIDATES: dict[str, ModelConfig] = {
    "deep": ModelConfig(
        name="stu_seg",
        stages=["stage2", "stage3", "stage5", "stage6"],
        options={"skips": False, "width": 16, "map_stages": ["stage3", "stage5", "stage6"]},
    ),
    "skips": ModelConfig(
        name="stu_seg", stages=["stage2", "stage3", "stage5"], options={"width": 16}
    ),
}


def build_model(
    name: str,
    backbone: str,
    stages: list[str] | None = None,
    options: dict | None = None,
    pretrained: bool = True,
    weights: str | None = None,
) -> KDModel:
    """Instantiate a registered model, checking its options against the model's dataclass."""
    if name == AUTO:  # a choice between models, made by kdad.train (engine.choose)
        raise KdadError("model auto is chosen by kdad.train (engine.choose.fit_auto): name a model")
    if name not in MODELS:
        raise KdadError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(cls.Options)}
    bad = sorted(set(options or {}) - known)
    if bad:
        raise KdadError(
            f"model {name} has no option {bad[0]!r}; options: {', '.join(sorted(known))}"
        )
    return cls(backbone, stages, pretrained, weights, cls.Options(**(options or {})))


def model_from_config(m: ModelConfig, pretrained: bool = True) -> KDModel:
    """The configured model; ``pretrained=False`` skips teacher weights (a checkpoint has them)."""
    return build_model(m.name, m.backbone, m.stages, m.options, pretrained, m.weights)


def saved_options(m: ModelConfig) -> dict:
    """Every option of ``m``'s model, its defaults filled in, as a run saves them: a default
    changed later does not change the run when it is resumed. Options that name files
    (``path`` in their field's metadata) are made absolute, so that a run can be tested and
    resumed from anywhere; tuples become lists, as a config file has them."""
    cls = MODELS.get(m.name)
    if cls is None:
        return m.options
    fields, defaults = dataclasses.fields(cls.Options), cls.Options()
    paths = {f.name for f in fields if f.metadata.get("path")}

    def saved(name: str, value: Any) -> Any:
        if name in paths and value:
            return str(Path(value).resolve())
        return list(value) if isinstance(value, tuple) else value

    options = {**{f.name: getattr(defaults, f.name) for f in fields}, **m.options}
    return {k: saved(k, v) for k, v in options.items()}


__all__ = [
    "CANDIDATES",
    "LR_SCHEDULES",
    "MODELS",
    "KDModel",
    "Output",
    "Phase",
    "build_model",
    "model_from_config",
]
