"""The ``kdad`` command: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdad.config import (
    RUNTIMES,
    CalibrationConfig,
    DataConfig,
    DDPMOptions,
    DemoConfig,
    DiffusionConfig,
    LaunchConfig,
    ModelConfig,
    PaintConfig,
    RunConfig,
    ScoreConfig,
    ServeConfig,
    TrainConfig,
)
from kdad.data.augment import AUGMENTATIONS
from kdad.data.layouts import LAYOUTS
from kdad.errors import KdadError


def _metrics_table(metrics: dict[str, float | None]) -> str:
    width = max(map(len, metrics))
    rows = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    rows += [f"{k:<{width}}  {'n/a' if v is None else f'{v:.4f}'}" for k, v in metrics.items()]
    return "\n".join(rows)


def _shown(cls: type, name: str) -> str:
    """The default of setting ``name`` of config dataclass ``cls``, as help text shows it."""
    value = getattr(cls, name)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _setting(p: argparse.ArgumentParser, cls: type, name: str, help: str = "", **kw: Any) -> None:
    """A flag for setting ``name`` of config dataclass ``cls``: its type and default come from
    the dataclass (the one source of settings), and the help shows the default."""
    default = getattr(cls, name)
    text = f"{help} ({_shown(cls, name)})" if help else f"default {_shown(cls, name)}"
    flag = "--" + name.replace("_", "-")
    p.add_argument(flag, type=type(default), default=default, help=text, **kw)


def _runtime_arg(p: argparse.ArgumentParser) -> None:
    _setting(
        p,
        ScoreConfig,
        "runtime",
        "what runs the model: auto is its graph in onnxruntime on the CPU, PyTorch on a GPU",
        choices=RUNTIMES,
    )


def _jobs_arg(p: argparse.ArgumentParser, what: str) -> None:
    _setting(
        p,
        LaunchConfig,
        "jobs",
        f"{what} trained at once in separate processes, the cores shared",
        metavar="N",
    )


def _data_args(p: argparse.ArgumentParser, required: bool, several: bool = False) -> None:
    p.add_argument("--data", required=required, help="dataset folder")
    p.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        help="folder layout (default: detected)",
    )
    if several:
        p.add_argument(
            "--category",
            nargs="+",
            help="MVTec category, when --data is the dataset root; several: one run each, "
            "in OUT/<category>",
        )
    else:
        p.add_argument("--category", help="MVTec category, when --data is the dataset root")


def _image_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size",
        type=_auto_or("pixels"),
        nargs="+",
        metavar="SIZE",
        help="auto: a square, or the training images' aspect when they share one that a square "
        "would squash; an input side; or HEIGHT WIDTH "
        f"(default {_shown(DataConfig, 'image_size')})",
    )


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value read as YAML: numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: value is not valid YAML") from e


def _nproc_arg(p: argparse.ArgumentParser) -> None:
    _setting(
        p,
        LaunchConfig,
        "nproc",
        "N data-parallel ranks on this machine (torchrun; one per GPU); "
        "or start kdad under torchrun yourself",
        metavar="N",
    )


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus its --nproc option, for the ranks the launcher starts."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _auto_or(unit: str) -> Callable[[str], int | str]:
    """An argparse type: the word ``auto`` or a whole number of ``unit``."""

    def parse(value: str) -> int | str:
        if value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not auto or a number of {unit}: {value!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdad", description="Defect detection by knowledge distillation."
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train a model on good images")
    _data_args(t, required=False, several=True)
    _jobs_arg(t, "categories")
    t.add_argument(
        "--model",
        help="method, or auto: the STU-Seg student chosen from your good images "
        f"(default {_shown(ModelConfig, 'name')})",
    )
    t.add_argument("--backbone", help=f"teacher (default {_shown(ModelConfig, 'backbone')})")
    t.add_argument("--stages", nargs="+", help="teacher stages feeding distillation")
    t.add_argument("--weights", help="local teacher weight file")
    t.add_argument(
        "--option",
        action="append",
        dest="options",
        type=key_value,
        metavar="KEY=VALUE",
        help="a model option (see docs/models.md), YAML value; repeatable",
    )
    t.add_argument(
        "--epochs",
        type=_auto_or("epochs"),
        help="epochs, or auto: as many as make the fixed schedule's optimiser steps "
        f"(default {_shown(TrainConfig, 'epochs')})",
    )
    t.add_argument("--batch-size", type=int, help=f"default {_shown(TrainConfig, 'batch_size')}")
    _image_size_arg(t)
    t.add_argument(
        "--augment",
        nargs="+",
        choices=AUGMENTATIONS,
        help="training views that are still normal for your part (none by default)",
    )
    t.add_argument("--lr", type=float, help=f"default {_shown(TrainConfig, 'lr')}")
    t.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        help=f"constant or cosine decay (default {_shown(TrainConfig, 'lr_schedule')})",
    )
    t.add_argument("--seed", type=int, help=f"default {_shown(TrainConfig, 'seed')}")
    t.add_argument(
        "--device", help=f"auto, cpu, cuda, cuda:N (default {_shown(TrainConfig, 'device')})"
    )
    t.add_argument("--num-workers", type=int, help=f"default {_shown(TrainConfig, 'num_workers')}")
    t.add_argument(
        "--holdout",
        type=float,
        help=f"good images held out for validation ({_shown(DataConfig, 'holdout')})",
    )
    t.add_argument(
        "--val-every",
        type=int,
        help="epochs between validations (0: at the end; with --patience, at the checkpoint "
        f"cadence) (default {_shown(TrainConfig, 'val_every')})",
    )
    t.add_argument(
        "--select", help=f"validation metric choosing best.pt ({_shown(TrainConfig, 'select')})"
    )
    t.add_argument(
        "--patience",
        type=int,
        help="stop after this many validations without a better --select; 0: never "
        f"(default {_shown(TrainConfig, 'patience')})",
    )
    t.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        help="auto: bf16 where the device has it natively, else fp32; bf16: training steps in "
        "bfloat16 autocast, faster on CPUs with native bf16 (AVX512-BF16, AMX) and on GPUs, "
        f"slower elsewhere; testing stays fp32 (default {_shown(TrainConfig, 'precision')})",
    )
    t.add_argument(
        "--teacher-cache-gb",
        type=float,
        help="memory for the frozen teacher's features, computed once when inputs repeat; 0: "
        f"recompute every step ({_shown(TrainConfig, 'teacher_cache_gb')})",
    )
    t.add_argument(
        "--image-cache-gb",
        type=float,
        help="memory for the training images, decoded and resized once; 0: every epoch "
        f"({_shown(TrainConfig, 'image_cache_gb')})",
    )
    t.add_argument(
        "--false-alarm-rate",
        type=float,
        help="share of good parts the calibrated threshold flags "
        f"({_shown(CalibrationConfig, 'false_alarm_rate')})",
    )
    t.add_argument("--out", help=f"run folder (default {_shown(RunConfig, 'out')})")
    t.add_argument("--config", help="YAML run config; flags override it")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    _nproc_arg(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("test", help="compute metrics on a labelled test set")
    e.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    _data_args(e, required=False)
    e.add_argument("--out", help="folder for metrics.json (default: the checkpoint's folder)")
    e.add_argument("--save-maps", metavar="FILE.npz", help="save maps, masks, labels, paths")
    _setting(e, ScoreConfig, "batch_size")
    _setting(e, ScoreConfig, "device")
    _runtime_arg(e)

    p = sub.add_parser("predict", help="score images and write heatmaps")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--f1-threshold-from",
        metavar="DIR",
        help="labelled validation folder (never the test set) to set an F1-best "
        "image threshold instead of the calibrated one",
    )
    _setting(p, ScoreConfig, "batch_size")
    _setting(p, ScoreConfig, "device")
    _runtime_arg(p)
    _nproc_arg(p)
    p.add_argument("--no-heatmaps", action="store_true", help="write no heatmap overlays")
    p.add_argument("--no-masks", action="store_true", help="write no defect masks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser(
        "demo", help="train, test and report on generated parts: kdad at work, with no data"
    )
    _setting(d, DemoConfig, "out", "folder for the parts, the run, the predictions, the report")
    _setting(d, DemoConfig, "epochs")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = sub.add_parser("report", help="a self-contained HTML report of a test or predict run")
    r.add_argument("source", help="run folder, metrics.json, or predict output folder")
    r.add_argument("--out", help="HTML file (default: report.html beside the source)")

    c = sub.add_parser(
        "calibrate", help="recompute a checkpoint's thresholds from its held-out good images"
    )
    c.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    c.add_argument("--false-alarm-rate", type=float, help="share of good parts flagged")
    c.add_argument("--pixel-quantile", type=float, help="quantile of good pixels")
    _setting(c, ScoreConfig, "device")

    ex = sub.add_parser("export", help="one ONNX graph: resize, model, calibrated decision")
    ex.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    ex.add_argument("--format", choices=["onnx"], help="onnx, the only one for now")
    ex.add_argument("--out", required=True, help="folder for model.onnx and kdad.json")

    sv = sub.add_parser("serve", help="HTTP service and web page for one model")
    sv.add_argument("--model", required=True, help="export folder (ONNX) or checkpoint/run")
    _setting(sv, ServeConfig, "host", "bind address")
    _setting(sv, ServeConfig, "port")
    _setting(sv, ServeConfig, "workers", "worker processes")

    sy = sub.add_parser("synth", help="a DDPM of good images that paints synthetic defects")
    syv = sy.add_subparsers(dest="synth_verb", required=True)
    st = syv.add_parser("train", help="train the DDPM on a dataset's good training images")
    _data_args(st, required=True)
    _setting(st, DiffusionConfig, "out", "run folder (gets ddpm.pt)")
    _image_size_arg(st)
    _setting(st, DDPMOptions, "crop", "side of the crops learnt")
    _setting(st, DiffusionConfig, "steps", "optimiser steps")
    _setting(st, DiffusionConfig, "batch_size")
    _setting(st, DiffusionConfig, "lr")
    _setting(st, DDPMOptions, "width", "U-Net width")
    _setting(st, DiffusionConfig, "seed")
    _setting(st, DiffusionConfig, "device")
    st.add_argument("--no-progress", action="store_true")
    ss = syv.add_parser("sample", help="paint defects into an MVTec-layout folder")
    ss.add_argument("--model", required=True, help="DDPM run folder or ddpm.pt")
    ss.add_argument("--out", required=True, help="folder for images, masks, synthetic.csv")
    _setting(ss, PaintConfig, "count", "defects to paint")
    ss.add_argument("--data", help="dataset (default: the one the DDPM learned)")
    _setting(ss, PaintConfig, "strength", "diffusion depth, 0-1")
    _setting(ss, PaintConfig, "sigma", "perturbation std")
    _setting(ss, PaintConfig, "grain", "pixels over which the perturbation is correlated")
    _setting(ss, PaintConfig, "steps", "denoising steps")
    _setting(
        ss,
        PaintConfig,
        "min_change",
        "a painted pixel is defect when its smoothed change exceeds this share of the range",
    )
    _setting(ss, PaintConfig, "mask_sigma", "smoothing of the change, pixels")
    _setting(
        ss,
        PaintConfig,
        "min_visibility",
        "a fainter defect is drawn again (its change over the part's structure)",
    )
    _setting(ss, PaintConfig, "seed")
    ss.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="run a grid of models x datasets x seeds from a YAML file")
    b.add_argument("grid", help="grid YAML (see kdad.grid)")
    b.add_argument("--models", nargs="+", help="run only these models of the grid (by name)")
    b.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="run only these seeds of the grid (one seed of every row first)",
    )
    _jobs_arg(b, "runs")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# One handler per verb: each turns its arguments into one kdad.api call and prints the result.
# kdad is imported inside them (deferred) so that `kdad --help` stays fast.


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named arguments, as keywords of the API function whose parameters they match."""
    return {n: getattr(args, n) for n in names}


def _train(args: argparse.Namespace) -> None:
    from kdad import api
    from kdad.config import OVERRIDES

    overrides = {k: getattr(args, k) for k in OVERRIDES}  # every flag maps to a field
    overrides["options"] = dict(args.options) if args.options else None
    if overrides["image_size"] and len(overrides["image_size"]) == 1:
        overrides["image_size"] = overrides["image_size"][0]
    cats = overrides.pop("category") or [None]
    common = {"config": args.config, "resume": args.resume, "progress": not args.no_progress}
    if len(cats) > 1:
        for cat, ckpt in api.train_categories(cats, args.jobs, **common, **overrides).items():
            print(f"checkpoint ({cat}): {ckpt}")
    else:
        print(f"checkpoint: {api.train(**common, category=cats[0], **overrides)}")


def _test(args: argparse.Namespace) -> None:
    from kdad import api

    ckpt = Path(args.checkpoint)
    out = args.out or (ckpt if ckpt.is_dir() else ckpt.parent)
    res = api.evaluate(
        ckpt,
        args.data,
        args.layout,
        args.category,
        out,
        args.batch_size,
        args.device,
        args.save_maps,
        args.runtime,
    )
    print(_metrics_table(res["metrics"]))
    print(f"metrics: {Path(out) / 'metrics.json'}")


def _predict(args: argparse.Namespace) -> None:
    from kdad import api

    names = ("checkpoint", "inputs", "out", "batch_size", "device", "f1_threshold_from", "runtime")
    csv_path, threshold = api.predict(
        **_pick(args, *names),
        progress=not args.no_progress,
        heatmaps=not args.no_heatmaps,
        masks=not args.no_masks,
    )
    if threshold is not None:
        print(f"image threshold (F1 on {args.f1_threshold_from}): {threshold:.6g}")
    print(f"predictions: {csv_path}")


def _demo(args: argparse.Namespace) -> None:
    import csv

    from kdad import api

    print(f"kdad demo: generated washers in {args.out}/data; training the default model...")
    res = api.demo(args.out, progress=not args.no_progress, epochs=args.epochs)
    print(_metrics_table(res["metrics"]))
    with open(res["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    print("\nverdicts on the test parts (kinds are the test folders; good parts should be ok):")
    kinds = sorted({Path(r["path"]).parent.name for r in rows})
    for kind in kinds:
        mine = [r for r in rows if Path(r["path"]).parent.name == kind]
        flagged = sum(r["decision"] == "defect" for r in mine)
        print(f"  {kind:<8} {len(mine):>3} parts: {flagged:>3} defect, {len(mine) - flagged:>3} ok")
    print(f"\nreport:      {res['report']}")
    print(f"predictions: {res['predictions']} (heatmaps/, masks/ beside it)")
    print(f"checkpoint:  {res['checkpoint']}")
    print("next: kdad train --data YOUR_GOOD_IMAGES --out runs/mine (README, 'Train')")


def _report(args: argparse.Namespace) -> None:
    from kdad import api

    print(f"report: {api.report(args.source, args.out)}")


def _calibrate(args: argparse.Namespace) -> None:
    from kdad import api

    cal = api.calibrate(args.checkpoint, args.false_alarm_rate, args.pixel_quantile, args.device)
    print(json.dumps(cal, indent=2))


def _export(args: argparse.Namespace) -> None:
    from kdad import api

    print(f"onnx: {api.export(args.checkpoint, args.out)}")


def _serve(args: argparse.Namespace) -> None:
    from kdad import api

    api.serve(args.model, args.host, args.port, args.workers)


def _synth_train(args: argparse.Namespace) -> None:
    from kdad import api

    names = ("data", "out", "layout", "category", "steps", "batch_size", "lr", "crop")
    names += ("width", "seed", "device")
    size = args.image_size or [DataConfig.image_size]
    size = size[0] if len(size) == 1 else size
    picked = _pick(args, *names)
    print(f"ddpm: {api.synth_train(**picked, image_size=size, progress=not args.no_progress)}")


def _synth_sample(args: argparse.Namespace) -> None:
    from kdad import api

    names = ("model", "out", "count", "data", "strength", "sigma", "grain", "steps", "seed")
    names += ("min_change", "mask_sigma", "min_visibility")
    csv_path, gallery = api.synth_sample(**_pick(args, *names), progress=not args.no_progress)
    print(f"defects: {csv_path}\ngallery: {gallery}")


SYNTH_VERBS = {"train": _synth_train, "sample": _synth_sample}


def _synth(args: argparse.Namespace) -> None:
    SYNTH_VERBS[args.synth_verb](args)


def _bench(args: argparse.Namespace) -> None:
    from kdad import api

    md, csv_path = api.bench(args.grid, not args.no_progress, args.models, args.jobs, args.seeds)
    print(md.read_text())
    print(f"tables: {md}, {csv_path}")


VERBS = {
    "train": _train,
    "test": _test,
    "predict": _predict,
    "report": _report,
    "demo": _demo,
    "calibrate": _calibrate,
    "export": _export,
    "serve": _serve,
    "synth": _synth,
    "bench": _bench,
}


def _run(args: argparse.Namespace) -> int:
    """Run the verb the arguments name; 0 when it returns (its errors are raised)."""
    VERBS[args.verb](args)
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"kdad: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdad`` console script; bad input ends with one line and status 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    from kdad.engine.distributed import current, launch, shutdown

    rank = current()
    prefix = "kdad" if rank.main else f"kdad[rank {rank.rank}]"
    try:
        several = args.verb == "train" and len(args.category or []) > 1
        if several and (args.nproc > 1 or rank.world > 1):
            raise KdadError("data-parallel training takes one category: one torchrun each")
        if getattr(args, "nproc", 1) > 1 and rank.world == 1:
            return launch(args.nproc, _without_nproc(argv))
        if rank.main:
            return _run(args)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # rank 0 says it once
            return _run(args)
    except KdadError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        print(f"{prefix}: error: {lines[-1] if lines else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
