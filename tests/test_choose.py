"""The default model (``auto``): candidates probed, the better on the synthetic validation kept
and trained to the end, exactly as if it had been trained alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec, save

import kdad
from kdad.config import RunConfig, apply_overrides
from kdad.engine import choose
from kdad.engine.checkpoint import load_checkpoint
from kdad.engine.choose import candidate, fit_auto, rank
from kdad.engine.fit import fit
from kdad.errors import KdadError
from kdad.models import CANDIDATES


def _cfg(data: Path, out: Path) -> RunConfig:
    return apply_overrides(
        RunConfig(),
        data=data,
        out=out,
        epochs=4,
        batch_size=4,
        image_size=64,
        seed=3,
        device="cpu",
        precision="fp32",
    )


def test_auto_keeps_the_better_candidate_and_trains_it_as_if_alone(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "d", n_train=12)
    cfg = _cfg(data, tmp_path / "run")
    assert cfg.model.name == "auto"  # the default
    ckpt = fit_auto(cfg, progress=False)
    record = json.loads((tmp_path / "run" / "choice.json").read_text())
    scores = {n: rank(c["validation"]) for n, c in record["candidates"].items()}
    assert set(scores) == set(CANDIDATES)
    assert scores[record["chosen"]] == max(scores.values())
    assert not (tmp_path / "run" / "candidates").exists()  # the other one is gone
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 4 and state["config"]["out"] == str(tmp_path / "run")
    assert state["config"]["model"]["stages"] == CANDIDATES[record["chosen"]].stages
    # The chosen student, paused after the probe and resumed, equals it trained unbroken.
    alone = fit(candidate(_cfg(data, tmp_path / "alone"), record["chosen"]), progress=False)
    ref = load_checkpoint(alone)
    for k, v in ref["model"].items():
        assert torch.equal(v, state["model"][k]), k
    assert [h["loss"] for h in ref["history"]] == [h["loss"] for h in state["history"]]
    # and it tests like any run
    assert kdad.evaluate(ckpt)["metrics"]["image_auroc"] is not None


@pytest.mark.slow
def test_auto_resumed_after_its_first_probe_ends_as_an_unbroken_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the first candidate's probe, ``kdad train --resume --out RUN`` (no data
    named: the probe's config has it) finishes the choice and the run as if never stopped."""
    data = make_mvtec(tmp_path / "d", n_train=12)
    whole = fit_auto(_cfg(data, tmp_path / "whole"), progress=False)

    def killed_after_a_probe(c: RunConfig, **kwargs: object) -> Path:
        fit(c, **kwargs)  # the probe runs and writes its checkpoint; then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(choose, "fit", killed_after_a_probe)
    with pytest.raises(KeyboardInterrupt):
        fit_auto(_cfg(data, tmp_path / "cut"), progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    cut = kdad.train(out=tmp_path / "cut", resume=True, progress=False)
    a, b = load_checkpoint(whole), load_checkpoint(cut)
    assert a["epoch"] == b["epoch"] == 4
    assert a["config"]["model"] == b["config"]["model"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_auto_refuses_settings_it_chooses_and_existing_folders(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "d")
    with pytest.raises(KdadError, match="model auto chooses its own stages and options"):
        kdad.train(data=data, out=tmp_path / "a", stages=["stage3"], progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(KdadError, match="exists: pass --resume"):
        kdad.train(data=data, out=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    with pytest.raises(KdadError, match="none are held out"):
        fit_auto(apply_overrides(_cfg(data, tmp_path / "c"), holdout=0.0), progress=False)


def colour_part(rng: np.random.Generator, defect: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A red striped part, uint8 (64, 64, 3), and its mask: a defect is a square whose stripes
    turn green at the same grey level (ITU-R 601 luma), visible only in colour."""
    y, x = np.mgrid[:64, :64]
    level = 0.5 + 0.2 * np.sin(2 * np.pi * (x + y) / 8 + rng.uniform(0, 2 * np.pi))
    red, green = np.array([1.0, 0.45, 0.45]), np.array([0.2, 0.8, 0.45])
    red, green = red / (red @ LUMA), green / (green @ LUMA)  # each of grey level 1
    img = level[..., None] * red + rng.normal(0, 0.01, (64, 64, 1))
    mask = np.zeros((64, 64), np.uint8)
    if defect:
        r, c = rng.integers(8, 40, 2)
        img[r : r + 16, c : c + 16] = level[r : r + 16, c : c + 16, None] * green
        mask[r : r + 16, c : c + 16] = 255
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


LUMA = np.array([0.299, 0.587, 0.114])


def test_default_finds_a_defect_seen_only_in_colour(tmp_path: Path) -> None:
    """Colour parts work at the default: a hue change at the same grey level is found."""
    rng = np.random.default_rng(0)
    root = tmp_path / "colour"
    for i in range(12):
        save(root / "train" / "good" / f"{i:03d}.png", colour_part(rng)[0])
    for i in range(4):
        save(root / "test" / "good" / f"{i:03d}.png", colour_part(rng)[0])
        img, mask = colour_part(rng, defect=True)
        grey = img.astype(float) @ LUMA
        assert abs(grey[mask > 0].mean() - grey[mask == 0].mean()) < 6  # no grey-level cue
        save(root / "test" / "hue" / f"{i:03d}.png", img)
        save(root / "ground_truth" / "hue" / f"{i:03d}_mask.png", mask)
    ckpt = fit_auto(_cfg(root, tmp_path / "run"), progress=False)
    m = kdad.evaluate(ckpt)["metrics"]  # measured: 1.0 and 0.995
    assert m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.9
