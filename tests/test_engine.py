"""Training engine: checkpoints are safe and resume reproduces an unbroken run."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save

from kdad.config import RunConfig, apply_overrides, load_config
from kdad.data.layouts import find_samples
from kdad.engine.checkpoint import load_checkpoint, save_checkpoint
from kdad.engine.distributed import native_bf16
from kdad.engine.fit import datasets, fit
from kdad.engine.schedule import (
    auto_epochs,
    checkpoint_interval,
    learning_rate,
    plan_message,
    should_stop,
    stale_validations,
    validation_interval,
)
from kdad.errors import KdadError, KdadWarning
from kdad.models import Phase


def _cfg(data: Path, out: Path, epochs: int) -> RunConfig:
    return apply_overrides(
        RunConfig(),
        model="rd",
        precision="fp32",
        data=data,
        out=out,
        epochs=epochs,
        batch_size=3,
        image_size=64,
        seed=7,
        device="cpu",
        val_every=1,
    )


def _same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["epoch"] == sb["epoch"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert [h["loss"] for h in sa["history"]] == [h["loss"] for h in sb["history"]]


@pytest.mark.slow
def test_resume_equals_unbroken_run(mvtec: Path, tmp_path: Path) -> None:
    full = fit(_cfg(mvtec, tmp_path / "full", 3), progress=False)
    fit(_cfg(mvtec, tmp_path / "split", 1), progress=False)
    part = fit(_cfg(mvtec, tmp_path / "split", 3), resume=True, progress=False)
    _same_state(full, part)
    assert not list((tmp_path / "split").glob(".*tmp"))  # atomic writes leave no temp file


def test_resume_after_kill(mvtec: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL after its first checkpoint resumes to the unbroken result."""
    args = [
        "--model",
        "rd",
        "--precision",
        "fp32",
        "--data",
        str(mvtec),
        "--epochs",
        "4",
        "--batch-size",
        "3",
        "--image-size",
        "64",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--no-progress",
        "--val-every",
        "1",
    ]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdad", "train", *args, "--out", str(run)])
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run)["epoch"] >= 1  # the checkpoint survived the kill intact
    subprocess.run(
        [sys.executable, "-m", "kdad", "train", *args, "--out", str(run), "--resume"], check=True
    )
    fit(_cfg(mvtec, tmp_path / "full", 4), progress=False)
    _same_state(tmp_path / "full" / "checkpoint.pt", run / "checkpoint.pt")


def test_small_sets_checkpoint_every_40_steps_worth(
    mvtec: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two steps an epoch: the checkpoint is written every 20 epochs (40 steps), at each
    validation and at the end, not after every epoch; resuming from it equals an unbroken run."""
    import kdad.engine.fit as engine_fit

    written: list[int] = []
    save = engine_fit.save_checkpoint

    def counting_save(path: Path, state: dict) -> None:
        if path.name == "checkpoint.pt":
            written.append(state["epoch"])
        save(path, state)

    monkeypatch.setattr(engine_fit, "save_checkpoint", counting_save)

    def cfg(out: str, epochs: int) -> RunConfig:
        return apply_overrides(_cfg(mvtec, tmp_path / out, epochs), val_every=0, image_size=32)

    fit(cfg("full", 23), progress=False)
    assert written == [20, 23]  # 7 images in batches of 3, the last of 1 dropped: 2 steps
    assert len(load_checkpoint(tmp_path / "full" / "checkpoint.pt")["history"]) == 23
    written.clear()
    fit(cfg("split", 21), progress=False)
    fit(cfg("split", 23), resume=True, progress=False)
    assert written == [20, 21, 23]
    _same_state(tmp_path / "full" / "checkpoint.pt", tmp_path / "split" / "checkpoint.pt")


def test_auto_size_and_precision_are_chosen_said_and_saved(tmp_path: Path, capsys) -> None:
    """By default, tall parts of one aspect train at that aspect (at about 256x256's pixel
    count); ``precision: auto`` is bf16 exactly where the CPU has it natively. Both are said at
    the start and saved in the run's config, so testing and resuming use them."""
    rng = np.random.default_rng(0)
    for i in range(5):
        save(tmp_path / "tall" / f"{i}.png", rng.integers(90, 110, (200, 50), dtype=np.uint8))
    cfg = apply_overrides(
        RunConfig(),
        model="rd",
        data=tmp_path / "tall",
        out=tmp_path / "r",
        epochs=1,
        batch_size=2,
        device="cpu",
        precision="auto",
    )
    assert cfg.data.image_size == "auto"  # the default
    fit(cfg, progress=True)
    saved = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["config"]
    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert saved["data"]["image_size"] == [512, 128]  # 4:1, multiples of 32 (stride 16)
    assert saved["train"]["precision"] == precision
    err = capsys.readouterr().err
    assert "kdad: input 512x128 (height x width), chosen: the training images share" in err
    assert f"kdad: precision {precision}, chosen: this CPU has" in err


def test_existing_run_is_never_overwritten(mvtec: Path, tmp_path: Path) -> None:
    ckpt = fit(_cfg(mvtec, tmp_path / "r", 1), progress=False)
    before = ckpt.read_bytes()
    with pytest.raises(KdadError, match="exists: pass --resume"):
        fit(_cfg(mvtec, tmp_path / "r", 1), progress=False)
    assert ckpt.read_bytes() == before


def test_checkpoint_is_plain_data(mvtec: Path, tmp_path: Path) -> None:
    ckpt = fit(_cfg(mvtec, tmp_path / "r", 1), progress=False)
    state = torch.load(ckpt, weights_only=True)  # nothing pickled but tensors and plain data
    assert state["config"]["model"]["name"] == "rd" and state["epoch"] == 1
    assert RunConfig.from_dict(state["config"]).train.betas == (0.5, 0.999)
    assert (tmp_path / "r" / "config.yaml").read_text().startswith("data:")
    # every option saved, defaults too, so that a default changed later leaves the run as it was
    options = load_config(tmp_path / "r" / "config.yaml").model.options
    assert options == state["config"]["model"]["options"]
    assert options["loss"] == "flat" and options["decoder_blocks"] == []  # a list, as in YAML


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(KdadError, match=r"junk\.pt: not a readable kdad checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(KdadError, match=r"other\.pt: not a kdad checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "ok.pt", {"config": {}, "model": {}})
    assert load_checkpoint(tmp_path / "ok.pt")["format"] == "kdad-checkpoint"


def test_weights_of_another_architecture_are_a_clear_error(mvtec: Path, tmp_path: Path) -> None:
    """A checkpoint whose model kdad now builds differently: one line naming the file, whether
    it is loaded to predict or to resume, and the file is left as it was."""
    from kdad.detector import Detector

    ckpt = fit(_cfg(mvtec, tmp_path / "r", 1), progress=False)
    state = load_checkpoint(ckpt)
    key = next(k for k, v in state["model"].items() if k.startswith("decoder") and v.ndim == 4)
    state["model"][key] = torch.zeros(3, 3, 1, 1)
    run = tmp_path / "r" / "checkpoint.pt"
    save_checkpoint(run, {k: v for k, v in state.items() if k not in ("format", "version")})
    before = run.read_bytes()
    with pytest.raises(KdadError, match=rf"checkpoint\.pt: its weights do not fit .*{key}"):
        Detector.load(run)
    with pytest.raises(KdadError, match=r"checkpoint\.pt: its weights do not fit this kdad's RD"):
        fit(_cfg(mvtec, tmp_path / "r", 2), resume=True, progress=False)
    assert run.read_bytes() == before


def test_best_epoch_is_chosen_on_validation_only(mvtec: Path, tmp_path: Path) -> None:
    cfg = _cfg(mvtec, tmp_path / "r", 3)
    chosen = fit(cfg, progress=False)
    assert chosen == tmp_path / "r" / "best.pt"
    last = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    vals = [h["val"][cfg.train.select] for h in last["history"]]
    best = load_checkpoint(tmp_path / "r")  # a run folder means its best.pt
    assert best["path"].endswith("best.pt") and best["epoch"] == 1 + int(np.argmax(vals))
    assert best["best"]["value"] == max(vals)
    train_paths = {str(s.path) for s in find_samples(mvtec, "train")}
    assert len(last["holdout"]) == 1 and set(last["holdout"]) <= train_paths
    test_paths = {str(s.path) for s in find_samples(mvtec, "test")}
    assert not set(last["holdout"]) & test_paths  # validation never touches the test set


def test_relative_data_path_is_stored_absolute(mvtec: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(mvtec.parent)
    cfg = _cfg(Path(mvtec.name), tmp_path / "r", 1)
    fit(cfg, progress=False)
    saved = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["config"]["data"]["path"]
    assert saved == str(mvtec.resolve())  # testable and resumable from any folder


def test_validation_interval_and_stopping_rule() -> None:
    assert validation_interval(3, 2, 100, 4) == 3  # set: as given
    # early stopping: as often as checkpoints, every 40 steps' worth of epochs
    assert [checkpoint_interval(s) for s in (1, 2, 39, 40, 43, 500)] == [40, 20, 2, 1, 1, 1]
    assert [validation_interval(0, s, 100, 4) for s in (1, 2, 43)] == [40, 20, 1]
    assert validation_interval(0, 43, 56, 0) == 56  # a fixed schedule: once, at the end
    assert [auto_epochs(s) for s in (43, 2, 5000)] == [56, 1200, 1]  # about 2400 steps
    vals = [0.1, 0.3, 0.2, 0.3, 0.25]  # epochs 1-5; the best is epoch 2 (a tie is no better)
    history = [{"epoch": e + 1, "val": {"pixel_ap": v}} for e, v in enumerate(vals)]
    history.insert(2, {"epoch": 2.5})  # an epoch without validation counts for nothing
    best = {"epoch": 2, "metric": "pixel_ap", "value": 0.3}
    assert stale_validations(history, best) == 3 and stale_validations(history, None) == 5
    assert should_stop(history, best, 3) and not should_stop(history, best, 4)
    assert not should_stop(history, best, 0)  # 0: never


def test_cosine_schedule_decays_within_each_phase() -> None:
    one, two = [Phase("train", 0)], [Phase("student", 0), Phase("head", 4)]
    assert [learning_rate(0.1, "constant", one, e, 4) for e in range(4)] == [0.1] * 4
    assert [learning_rate(0.1, "cosine", one, e, 4) for e in range(4)] == pytest.approx(
        [0.1, 0.1 * (2 + 2**0.5) / 4, 0.05, 0.1 * (2 - 2**0.5) / 4]
    )
    lrs = [learning_rate(0.1, "cosine", two, e, 6) for e in range(6)]
    assert lrs[0] == lrs[4] == 0.1 and lrs[2] == pytest.approx(0.05)  # each phase starts anew
    assert lrs[5] == pytest.approx(0.05) and min(lrs) > 0
    own = [Phase("student", 0), Phase("head", 4, lr_schedule="cosine")]  # the head's own
    lrs = [learning_rate(0.1, "constant", own, e, 6) for e in range(6)]
    assert lrs[:5] == [0.1] * 5 and lrs[5] == pytest.approx(0.05)
    own = [Phase("student", 0), Phase("head", 2, lr_schedule="constant")]
    assert [learning_rate(0.1, "cosine", own, e, 4) for e in range(4)] == [0.1, 0.05, 0.1, 0.1]


def test_cosine_run_sets_each_epochs_rate_and_rejects_unknown_schedules(
    mvtec: Path, tmp_path: Path
) -> None:
    c = _cfg(mvtec, tmp_path / "cos", 3)
    c.train.lr_schedule, c.train.val_every = "cosine", 3
    fit(c, progress=False)
    lr = load_checkpoint(tmp_path / "cos" / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.005 * 0.25)  # the last of 3 epochs: (1 + cos(2 pi / 3)) / 2
    c = _cfg(mvtec, tmp_path / "bad", 1)
    c.train.lr_schedule = "step"
    with pytest.raises(KdadError, match="lr_schedule must be constant or cosine, got 'step'"):
        fit(c, progress=False)
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_bf16_training_autocasts_and_keeps_fp32_weights(mvtec: Path, tmp_path: Path) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        c = _cfg(mvtec, tmp_path / precision, 2)
        c.train.precision = precision
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(c, progress=False)
        emulated = [w for w in caught if "no native bfloat16" in str(w.message)]
        assert len(emulated) == (precision == "bf16" and not native_bf16(torch.device("cpu")))
        runs[precision] = load_checkpoint(tmp_path / precision / "checkpoint.pt")
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16["config"]["train"]["precision"] == "bf16"
    assert all(v.dtype != torch.bfloat16 for v in bf16["model"].values())  # weights stay fp32
    # the same seeded run in bfloat16: other arithmetic, so other weights, but the same course
    assert not all(torch.equal(v, fp32["model"][k]) for k, v in bf16["model"].items())
    for a, b in zip(fp32["history"], bf16["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
    c = _cfg(mvtec, tmp_path / "bad", 1)
    c.train.precision = "fp16"
    with pytest.raises(KdadError, match="precision must be fp32, bf16 or auto, got 'fp16'"):
        fit(c, progress=False)


def test_training_stops_when_validation_stops_improving(mvtec: Path, tmp_path: Path) -> None:
    cfg = apply_overrides(_cfg(mvtec, tmp_path / "r", 40), patience=2)
    assert fit(cfg, progress=False) == tmp_path / "r" / "best.pt"
    last = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    history, best = last["history"], last["best"]
    # Stopped at the first epoch where 2 validations in a row had not beaten the best, and no
    # sooner: checked against the rule replayed on the run's own validation values.
    vals = [h["val"]["pixel_ap"] for h in history]
    stops = [e + 1 for e in range(len(vals)) if e + 1 - (1 + int(np.argmax(vals[: e + 1]))) >= 2]
    assert stops and last["epoch"] == stops[0] < 40 and history[-1]["stopped_early"]
    assert best["epoch"] == 1 + int(np.argmax(vals)) == load_checkpoint(tmp_path / "r")["epoch"]
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()  # resuming a stopped run: nothing
    fit(_cfg(mvtec, tmp_path / "r", 40), resume=True, progress=False)
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before


def test_train_says_its_plan_and_expected_time(mvtec: Path, tmp_path: Path) -> None:
    args = ["--data", str(mvtec), "--model", "rd", "--epochs", "3", "--batch-size", "2"]
    args += ["--image-size", "32"]
    proc = subprocess.run(
        [sys.executable, "-m", "kdad", "train", *args, "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    # 8 good images, 1 held out: 7 to fit in batches of 2 -> 4 steps an epoch (the last of 1
    # image is dropped: 3); a fixed schedule (no early stopping) validates once, at the end.
    assert "rd on 7 images: 3 epochs x 3 steps = 9 steps; validation on 1 held-out images at " in (
        proc.stderr
    )
    assert re.search(r"kdad: \d+\.\d\d s a step, \S+ an epoch: \d\S* more", proc.stderr)
    # with early stopping: every 40 steps' worth of epochs, and "at most"
    early = plan_message("rd", 7, 1, 30, 3, checkpoint_interval(3), 4, "pixel_ap")
    assert "at most 30 epochs x 3 steps = 90 steps" in early
    assert "every 14 epochs, stopping after 4 without a better pixel_ap" in early


def test_teacher_features_cached_once_train_as_computed(mvtec: Path, tmp_path: Path) -> None:
    """The cache holds what the teacher computes (to float rounding), and a run on it follows
    the run that recomputes them: same first-epoch loss, both learning."""
    from kdad.data.dataset import TrainSet
    from kdad.engine.teacher_cache import build_cache
    from kdad.models import build_model

    model = build_model("rd", "efficientnet_lite0").eval()
    ds = TrainSet(find_samples(mvtec, "train"), 64, (0.5,) * 3, (0.25,) * 3)
    cache = build_cache(model.teacher, ds, torch.device("cpu"), 2**30)
    assert cache is not None and cache.feats[0].shape[0] == len(ds)
    idx = torch.tensor([5, 0, 3])
    x = torch.stack([ds[i]["image"] for i in idx.tolist()])
    with torch.no_grad():
        fresh = model.teacher(x)
    given = model.teach(x, cache.features(idx))  # looked up by the batch's own indices
    for a, b in zip(fresh, given):  # ~1e-6 of the largest feature apart (batching, layout)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    with pytest.raises(KdadError, match=r"teacher features of \[2\] images given for a batch of 3"):
        model.teach(x, cache.features(idx[:2]))  # another batch's features are refused
    assert build_cache(model.teacher, ds, torch.device("cpu"), 1000) is None  # over budget

    cached = fit(_cfg(mvtec, tmp_path / "cached", 3), progress=False)
    cfg = _cfg(mvtec, tmp_path / "plain", 3)
    cfg.train.teacher_cache_gb = 0
    plain = fit(cfg, progress=False)
    hc, hp = load_checkpoint(cached)["history"], load_checkpoint(plain)["history"]
    assert abs(hc[0]["loss"] - hp[0]["loss"]) < 1e-3 * hp[0]["loss"]
    assert hc[-1]["loss"] < hc[0]["loss"] and hp[-1]["loss"] < hp[0]["loss"]


def test_denoising_students_clean_targets_cached_train_as_computed(
    mvtec: Path, tmp_path: Path
) -> None:
    """With synthetic defects the inputs change every epoch but their clean versions do not:
    the cache holds the clean images' features by ``clean_index``, and a DeST-DDPM run on it
    follows one that recomputes them."""
    from kdad.engine.teacher_cache import build_cache
    from kdad.models import model_from_config

    cfg = _cfg(mvtec, tmp_path / "cached", 2)
    cfg.model.name, cfg.model.options = "dest_ddpm", {"defects": "perlin", "student_share": 0.5}
    model = model_from_config(cfg.model, pretrained=False).eval()
    ds, _ = datasets(cfg, model)
    cache = build_cache(model.teacher, ds, torch.device("cpu"), 2**30)
    assert cache is not None and cache.key == "clean_index"
    items = [ds[i] for i in range(len(ds))]
    assert any(x["mask"].any() for x in items)  # inputs with defects, looked up by clean
    batch = {k: torch.stack([x[k] for x in items]) for k in ("image", "clean", "clean_index")}
    assert cache.attach(batch) is None  # the inputs' own features are not these
    with torch.no_grad():
        fresh = model.teacher(batch["clean"])
    for a, b in zip(fresh, batch["clean_teacher"]):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    cfg.data.augment = ["hflip"]  # views change the clean images too: nothing to cache
    viewed, _ = datasets(cfg, model)
    assert build_cache(model.teacher, viewed, torch.device("cpu"), 2**30) is None

    cfg.data.augment = []
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.out, plain_cfg.train.teacher_cache_gb = str(tmp_path / "plain"), 0
    with pytest.warns(KdadWarning, match="the head gets 2 optimiser steps"):
        cached, plain = fit(cfg, progress=False), fit(plain_cfg, progress=False)
    hc, hp = load_checkpoint(cached)["history"], load_checkpoint(plain)["history"]
    assert abs(hc[0]["loss"] - hp[0]["loss"]) < 1e-3 * hp[0]["loss"]
