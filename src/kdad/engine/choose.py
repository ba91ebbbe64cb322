"""``model.name: auto``, the default: the student for this part, chosen from its good images.

No one student leads on every part: ``models.CANDIDATES`` names the students that lead on
different ones (docs/models.md says which and why). So each candidate trains for the first
``PROBE`` of the schedule, in RUN/candidates/NAME; each is scored on the held-out good training
images, each also with ``DRAWS`` Perlin defects (no test image); the better by ``RANK_BY`` moves
into RUN and continues to the end of its schedule, and the other is deleted. RUN/choice.json
keeps every candidate's settings and validation. docs/benchmarks.md (issue 29) has the
measurements behind the candidates, the probe's length and the ranking.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kdad.config import RunConfig, load_config, save_config
from kdad.data.dataset import AUTO
from kdad.data.layouts import training_samples
from kdad.engine.checkpoint import load_checkpoint, load_weights
from kdad.engine.distributed import barrier, broadcast, current, resolve_device
from kdad.engine.evaluate import evaluate_model
from kdad.engine.fit import fit, validation_set
from kdad.engine.infer import fit_normal
from kdad.engine.lock import run_lock
from kdad.errors import KdadError
from kdad.files import atomic_write
from kdad.models import CANDIDATES, model_from_config

PROBE = 0.25  # share of the schedule each candidate trains before the choice
DRAWS = 4  # synthetic defects drawn on each held-out good image for the choice
# what decides, in order: image AUROC ranked the candidates as the test sets did on both
# Magnetic Tile and battery-weld; pixel AP on Perlin blobs did not on battery-weld
RANK_BY = ("image_auroc", "pixel_ap")


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train a run: its model (``engine.fit``), or with model auto the student chosen here."""
    if cfg.model.name == AUTO:
        return fit_auto(cfg, resume=resume, progress=progress)
    return fit(cfg, resume=resume, progress=progress)


def fit_auto(cfg: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Probe every candidate, keep the best on the synthetic validation, train it to the end in
    ``cfg.out``; returns the checkpoint to use, as ``engine.fit.fit`` does. With ``resume``,
    unfinished probes go on, and a chosen run continues. RUN is locked while it chooses."""
    out = Path(cfg.out)
    if resume and (out / "checkpoint.pt").is_file():  # chosen already
        return fit(cfg, resume=True, progress=progress)
    if resume and (out / "config.yaml").is_file():  # the request, saved when the choice began
        cfg = load_config(out / "config.yaml")
        cfg.out = str(out)
    if cfg.model.stages is not None or cfg.model.options:
        raise KdadError(
            "model auto chooses its own stages and options: name a model (--model NAME) to set them"
        )
    if not training_samples(cfg.data)[1]:
        raise KdadError(
            f"{cfg.data.path}: model auto chooses on held-out good images, and none are held "
            "out: raise --holdout, add good images, or name a model (--model NAME)"
        )
    main = current().main
    with run_lock(out) if main else nullcontext():
        if main and not resume and any(f.name != ".lock" for f in out.iterdir()):
            raise KdadError(f"{out} exists: pass --resume to continue it, or another --out")
        if main and not (out / "config.yaml").is_file():  # what a resumed choice goes on with
            cfg.data.path = str(Path(cfg.data.path).resolve())
            save_config(cfg, out / "config.yaml")
        scores = {}
        for name in CANDIDATES:
            c = candidate(cfg, name)
            ckpt = Path(c.out) / "checkpoint.pt"
            if progress and main:
                tqdm.write(probe_message(name, c), file=sys.stderr)
            fit(c, resume=ckpt.is_file(), progress=progress, pause=PROBE)
            scores[name] = validate(ckpt)
        chosen = broadcast(
            max(scores, key=lambda n: (*rank(scores[n]), -list(CANDIDATES).index(n)))
        )
        if main:
            record = {
                "chosen": chosen,
                "rule": (
                    f"highest {', then '.join(RANK_BY)} on the held-out good images with "
                    f"{DRAWS} synthetic defects each, after {PROBE:.0%} of the schedule"
                ),
                "candidates": {
                    n: {**asdict(m), "validation": scores[n]} for n, m in CANDIDATES.items()
                },
            }
            text = json.dumps(record, indent=2)
            atomic_write(out / "choice.json", lambda tmp: tmp.write_text(text))
            if progress:
                tqdm.write(choice_message(chosen, scores), file=sys.stderr)
            for f in ("checkpoint.pt", "best.pt", "config.yaml"):  # the chosen run moves up
                if (out / "candidates" / chosen / f).is_file():  # best.pt: a probe that ended
                    os.replace(out / "candidates" / chosen / f, out / f)  # the schedule
            shutil.rmtree(out / "candidates")
        barrier()
    return fit(cfg, resume=True, progress=progress)


def candidate(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` with candidate ``name``'s model (the run's backbone and weights), in
    RUN/candidates/NAME."""
    c = copy.deepcopy(cfg)
    c.model = copy.deepcopy(CANDIDATES[name])
    c.model.backbone, c.model.weights = cfg.model.backbone, cfg.model.weights
    c.out = str(Path(cfg.out) / "candidates" / name)
    return c


def rank(metrics: dict[str, float | None]) -> tuple[float, ...]:
    """The values the choice compares, ``RANK_BY``'s metrics in order (a missing one: 0)."""
    return tuple(metrics[m] or 0.0 for m in RANK_BY)


def validate(checkpoint: Path) -> dict[str, float | None]:
    """Every metric of a paused run's model on its held-out good images, each also with
    ``DRAWS`` synthetic defects, after fitting the good ones (as training's own validation
    does; the run itself is untouched)."""
    state = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(state["config"], str(checkpoint))
    val = validation_set(cfg, training_samples(cfg.data)[1], DRAWS)
    assert val is not None  # fit_auto checked that images are held out
    model = model_from_config(cfg.model, pretrained=False).to(resolve_device(cfg.train.device))
    load_weights(model, state)
    fit_normal(model, val.good(), cfg.train.batch_size)
    return evaluate_model(model, val, cfg.train.batch_size).metrics()


def probe_message(name: str, c: RunConfig) -> str:
    """The line that says which candidate is probed, and for how long."""
    m = c.model
    options = ", ".join(f"{k} {v}" for k, v in m.options.items())
    return (
        f"kdad: candidate {name!r} ({m.name}, stages {' '.join(m.stages or [])}, {options}): "
        f"the first {PROBE:.0%} of its schedule, then the choice"
    )


def choice_message(chosen: str, scores: dict[str, dict[str, Any]]) -> str:
    """The line that says which student was chosen, and on what."""
    values = "; ".join(f"{n} " + " ".join(f"{v:.3f}" for v in rank(s)) for n, s in scores.items())
    return (
        f"kdad: student {chosen!r} chosen on held-out good images with synthetic defects "
        f"({' / '.join(RANK_BY)}: {values})"
    )
