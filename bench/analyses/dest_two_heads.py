"""Two segmentation heads on one DeST-DDPM student: one taught DRAEM's Perlin masks (3-8% of
the image), one wider masks, their maps combined. Wide masks lift Magnetic Tile's wide Uneven
bands and cost battery-weld's small defects (docs/benchmarks.md, "Perlin defects of many
sizes"); the student's own map does not change with the masks, the head carries both.

``train``: from a finished run (its ``checkpoint.pt``), a new run folder that resumes it at
the head phase's first epoch with a freshly initialised head and other ``mask_thresholds``
(and any model option, ``--option KEY=VALUE``): the engine trains, validates and calibrates
the new head on the same frozen student. Trained with the run's own settings, the new head
is the run's own, to the last digit.

    python bench/analyses/dest_two_heads.py train runs/area/mtd_dest_area_mid-s0 \
        --mask-thresholds 0.5 0.5 --out runs/two_heads/mtd_draem-s0

``score``: the pixel metrics of maps made of both runs' heads (their students must be one),
each head's map and the student's standardised over the held-out good images' pixels (the
model's rule): each head with the student, the max of the heads with it, their mean with it;
``--student-weights`` adds the first head with the student's map so weighted (0: the head alone).
Magnetic Tile: one half (``--half``); another dataset: its whole test set.

    python bench/analyses/dest_two_heads.py score runs/two_heads/mtd_draem-s0/best.pt \
        runs/area/mtd_dest_area_mid-s0/best.pt \
        --out bench/results/dest_default/two_heads/mtd_s0_dev.json

``split``: a checkpoint of a model with both heads (option ``wide_head``) as two one-head
checkpoints, ``first`` and ``wide`` under ``--out``, for ``score`` to compare its heads.

    python bench/analyses/dest_two_heads.py split runs/two_heads_e2e/mtd_dest_two_heads-s0/best.pt \
        --out runs/two_heads_e2e/split/mtd-s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).parent))  # bench/analyses/, for dest_scores
from common import write_result
from dest_scores import KEYS, outputs, rescored_samples, student_map, z

from kdad.cli import key_value
from kdad.config import RunConfig
from kdad.data.layouts import training_samples
from kdad.detector import Detector
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint
from kdad.engine.fit import fit
from kdad.metrics import compute_metrics, image_auroc
from kdad.models import LR_SCHEDULES, model_from_config


def train(
    run: Path,
    thresholds: list[float],
    out: Path,
    lr_schedule: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Resume ``run``'s last checkpoint into ``out`` at the head phase's start, the head
    re-initialised (as a new run of the same seed builds it) and taught ``thresholds``, with
    ``lr_schedule`` if given. A run of two heads (``wide_head``) gives its student to a model
    of one head, whose schedule (``schedule_steps``) must start its head where the run did.
    ``extra``: other model options for the new head (``--option``, e.g. ``head_width=32``)."""
    state = load_checkpoint(run / "checkpoint.pt")
    cfg = RunConfig.from_dict(state["config"], str(run))
    epochs = cfg.train.epochs
    if state["epoch"] != epochs:
        raise SystemExit(f"{run}: not finished ({state['epoch']} of {epochs} epochs)")
    two = cfg.model.options.get("wide_head") is not None
    if two:  # student, first head, second head: a one-head run ends where the second starts
        _, first, wide = model_from_config(cfg.model, False).phases(epochs)
        cfg.train.epochs = epochs = wide.start
    options = {k: v for k, v in cfg.model.options.items() if k != "wide_head"}
    cfg.model.options = {**options, **(extra or {}), "mask_thresholds": list(thresholds)}
    if lr_schedule:
        cfg.train.lr_schedule = lr_schedule
    torch.manual_seed(cfg.train.seed)
    fresh = model_from_config(cfg.model, pretrained=False)
    start = next(p.start for p in fresh.phases(epochs) if p.name == "head")
    if two and start != first.start:
        raise SystemExit(f"{run}: its student's epochs ({first.start}) are not a one-head run's")
    weights = {k: v for k, v in state["model"].items() if not k.startswith("wide_")}
    weights.update({k: v for k, v in fresh.state_dict().items() if k.startswith("head.")})
    optimiser = torch.optim.Adam(fresh.param_groups(), lr=cfg.train.lr, betas=cfg.train.betas)
    out.mkdir(parents=True, exist_ok=False)
    save_checkpoint(
        out / "checkpoint.pt",
        {
            "config": cfg.to_dict(),
            "model": weights,
            "epoch": start,
            "calibration": None,
            "holdout": state["holdout"],
            "history": list(state["history"])[:start],
            "best": None,
            "optimizer": optimiser.state_dict(),
        },
    )
    cfg.out = str(out)
    fit(cfg, resume=True)


def split(checkpoint: Path, out: Path) -> None:
    """``checkpoint``'s two heads as one-head checkpoints ``out/first`` and ``out/wide``."""
    state = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(state["config"], str(checkpoint))
    if not cfg.model.options.get("wide_head"):
        raise SystemExit(f"{checkpoint}: a model of one head")
    cfg.model.options = {k: v for k, v in cfg.model.options.items() if k != "wide_head"}
    weights = {k: v for k, v in state["model"].items() if not k.startswith("wide")}
    wide = {
        k.removeprefix("wide_"): v for k, v in state["model"].items() if k.startswith("wide_head.")
    }
    for name, w in (("first", weights), ("wide", {**weights, **wide})):
        (out / name).mkdir(parents=True, exist_ok=True)
        save_checkpoint(out / name / "best.pt", {**state, "config": cfg.to_dict(), "model": w})


def score(a: Path, b: Path, half: str, out: str, weights: tuple[float, ...] = ()) -> None:
    """Pixel metrics of the maps made of ``a``'s and ``b``'s heads on their shared student;
    with ``weights``, also ``a``'s head plus each weight times the student's map."""
    da, db = Detector.load(a), Detector.load(b)
    sa, sb = (
        {k: v for k, v in d.model.state_dict().items() if not k.startswith("head.")}
        for d in (da, db)
    )
    same = sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) for k in sa if "normal" not in k and k != "scale_weights"
    )
    if not same:
        raise SystemExit(f"{a} and {b}: their teachers and students differ")
    _, held = training_samples(da.cfg.data)
    test = rescored_samples(da, half)
    labels = np.array([s.label for s in test])
    good = {"a": outputs(da, held), "b": outputs(db, held)}
    o = {"a": outputs(da, test), "b": outputs(db, test)}
    means = [m.mean() for m in good["a"]["cos"]]
    scales = slice(len(means) - 3, None)  # the model's strides 8-32
    s = z(
        student_map(o["a"]["cos"][scales], means[scales]),
        student_map(good["a"]["cos"][scales], means[scales]),
    )
    ha, hb = (z(o[k]["head"], good[k]["head"]) for k in ("a", "b"))
    maps = {
        "head a + student": ha + s,
        "head b + student": hb + s,
        "max(heads) + student": np.maximum(ha, hb) + s,
        "mean(heads) + student": (ha + hb) / 2 + s,
        "head a alone": ha,
        "head b alone": hb,
        "student alone": s,
        **{f"head a + {w:g} student": ha + w * s for w in weights},
    }
    result = {}
    for name, m in maps.items():
        met = compute_metrics(o["a"]["model_score"], labels, m, o["a"]["masks"])
        result[name] = {k: met[k] for k in KEYS}
        print(f"{name:24s} " + " ".join(f"{k} {100 * met[k]:.1f}" for k in KEYS), flush=True)
    image = {k: image_auroc(o[k]["model_score"], labels) for k in o}
    print(" ".join(f"image_auroc {k} {100 * v:.1f}" for k, v in image.items()), flush=True)
    settings = {"a": str(a), "b": str(b), "half": half}
    write_result(
        out,
        {"benchmark": "dest_two_heads", "settings": settings, "maps": result, "image_auroc": image},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("run", type=Path)
    t.add_argument("--mask-thresholds", type=float, nargs=2, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="default: the run's")
    t.add_argument(
        "--option", type=key_value, action="append", default=[], help="KEY=VALUE, a model option"
    )
    s = sub.add_parser("score")
    s.add_argument("a", type=Path)
    s.add_argument("b", type=Path)
    s.add_argument("--half", choices=("dev", "final"), default="dev")
    s.add_argument("--out", required=True)
    s.add_argument("--student-weights", type=float, nargs="*", default=[], help="of its map")
    p = sub.add_parser("split")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.command == "train":
        train(args.run, args.mask_thresholds, args.out, args.lr_schedule, dict(args.option))
    elif args.command == "split":
        split(args.checkpoint, args.out)
    else:
        score(args.a, args.b, args.half, args.out, tuple(args.student_weights))


if __name__ == "__main__":
    main()
