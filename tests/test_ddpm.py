"""The DDPM and `kdad synth`: noise schedule, masked painting, the sample folder, and the
DeST-DDPM training set drawn from it."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec
from PIL import Image

from kdad.config import DataConfig, DDPMOptions, DiffusionConfig, PaintConfig, RunConfig
from kdad.data.dataset import resize_image
from kdad.data.io import read_image, read_mask
from kdad.data.layouts import training_samples
from kdad.engine.fit import datasets
from kdad.errors import KdadError, KdadWarning
from kdad.models import model_from_config
from kdad.synth.bank import read_bank
from kdad.synth.datasets import SyntheticTrainSet
from kdad.synth.ddpm import DDPM, unit_field
from kdad.synth.diffusion import load_ddpm, paint_changed, train_ddpm, visibility


def kdad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdad", *args], capture_output=True, text=True, check=False
    )


def test_schedule_ends_in_noise_and_loss_trains() -> None:
    torch.manual_seed(0)
    model = DDPM(DDPMOptions(crop=16, channels=1, width=16, levels=2, max_depth=1.0))
    ab = model.alpha_bar
    assert (ab.diff() < 0).all() and ab[0] > 0.999 and ab[-1] < 1e-4
    x0 = torch.zeros(4096, 1, 1, 1) + 0.8
    xt = model.noised(x0, torch.full((4096,), 999), torch.randn_like(x0))
    assert abs(xt.mean()) < 0.05 and abs(xt.std() - 1) < 0.05  # q(x_T | x_0) is N(0, 1)
    x = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(8, 1, 16, 16).contiguous()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    losses = []
    for _ in range(60):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])  # it learns to predict noise


def test_training_draws_only_the_steps_painting_uses() -> None:
    model = DDPM(DDPMOptions(crop=16, channels=1, width=16, levels=2, max_depth=0.2))
    assert model.deepest == 199
    seen = []
    model.net.forward = lambda x, t: seen.append(t) or torch.zeros_like(x)
    torch.manual_seed(0)
    for _ in range(50):
        model.loss(torch.zeros(64, 1, 16, 16))
    t = torch.cat(seen)
    assert t.min() == 0 and 190 <= t.max() <= 199  # the whole learnt range, nothing deeper
    with pytest.raises(ValueError, match=r"strength must be in \[0.001, 0.2\]"):
        DDPM(model.opt).paint(torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16), 0.3, 1, 0, 5)


def test_paint_changes_only_the_mask_and_is_seeded_at_any_size() -> None:
    torch.manual_seed(0)
    model = DDPM(DDPMOptions(crop=16, channels=3, width=16, levels=3)).eval()
    x0 = torch.rand(2, 3, 18, 30) * 2 - 1  # not the crop learnt, not a multiple of 4
    mask = torch.zeros(2, 1, 18, 30)
    mask[..., 4:10, 5:12] = 1

    def paint(seed: int, grain: float = 0.0) -> torch.Tensor:
        return model.paint(x0, mask, 0.1, 0.5, grain, 5, torch.Generator().manual_seed(seed))

    a, b, c = paint(1), paint(1), paint(2)
    inside = mask.expand_as(x0) > 0
    assert a.shape == x0.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[~inside], x0[~inside])
    assert (a[inside] - x0[inside]).abs().mean() > 0.05 and a.abs().max() <= 1
    assert torch.equal(paint(1, 2.0)[~inside], x0[~inside])


def test_perturbation_is_gaussian_of_constant_variance_white_or_grained() -> None:
    noise = torch.randn(4, 1, 128, 128, generator=torch.Generator().manual_seed(0))

    def neighbour_corr(x: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]

    assert torch.equal(unit_field(noise, 0), noise) and abs(neighbour_corr(noise)) < 0.05
    for grain in (2.0, 6.0):
        field = unit_field(noise, grain)
        assert torch.allclose(field.std((2, 3)), torch.ones(4, 1), atol=1e-4)  # constant variance
        assert neighbour_corr(field) > 0.85  # a blotch, not specks


def test_defect_masks_are_the_pixels_painting_changed() -> None:
    torch.manual_seed(0)
    model = DDPM(DDPMOptions(crop=16, channels=1, width=16, levels=2)).eval()
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1

    def paint(**kw: float) -> PaintConfig:
        raw = dict(strength=0.1, sigma=0.5, grain=0, steps=5, mask_sigma=0, min_visibility=0)
        return PaintConfig(**(raw | {"min_change": 0.1} | kw))

    def drawn(cfg: PaintConfig) -> tuple[torch.Tensor, torch.Tensor]:
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        return paint_changed(model, x0, rng, gen, cfg)

    painted, masks = drawn(paint())
    change = (painted - x0).abs() / 2  # share of the value range
    assert masks.flatten(1).sum(1).min() > 0  # never empty
    assert torch.equal(masks > 0, change > 0.1)  # exactly the pixels changed by more than 0.1
    assert (change[masks == 0] == 0).all()  # what changed too little keeps the source
    painted, masks = drawn(paint(min_change=0.05, mask_sigma=1.5))
    assert torch.equal(masks > 0, painted != x0)  # the mask is exactly what differs
    assert ((painted - x0).abs()[masks > 0] / 2 < 0.05).any()  # smoothing keeps weak pixels
    with pytest.raises(KdadError, match="raise --sigma"):
        drawn(paint(min_change=1.0))  # no pixel can change that much


def test_faint_defects_are_drawn_again_and_the_most_visible_kept() -> None:
    torch.manual_seed(0)
    model = DDPM(DDPMOptions(crop=16, channels=1, width=16, levels=2)).eval()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    kept = {}
    for bound in (0.0, 1e9):  # the first visible draw, or the best of all draws
        cfg = PaintConfig(strength=0.1, sigma=0.5, steps=5, min_visibility=bound)
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        painted, masks = paint_changed(model, x0, rng, gen, cfg)
        kept[bound] = visibility(painted, x0, masks > 0)
    assert (kept[1e9] >= kept[0.0]).all() and (kept[1e9] > kept[0.0]).any()


@pytest.mark.slow
def test_synth_train_and_sample_write_an_mvtec_folder(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "data", n_train=12)
    run, out = tmp_path / "ddpm", tmp_path / "defects"
    args = ["--data", str(data), "--out", str(run), "--image-size", "32", "40", "--crop", "16"]
    args += ["--steps", "5"]
    proc = kdad("synth", "train", *args, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    again = kdad("synth", "train", *args, "--no-progress")
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
    proc = kdad("synth", "sample", "--model", str(run), "--out", str(out), "--count", "5")
    assert proc.returncode == 0, proc.stderr
    with open(out / "synthetic.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    fit, _ = training_samples(DataConfig(path=str(data)))
    assert {r["source"] for r in rows} <= {str(s.path.resolve()) for s in fit}
    for r in rows:  # painted at the detector's size, where the DDPM learnt the part
        img, mask = read_image(out / r["image"]), read_mask(out / r["mask"])
        src = resize_image(
            torch.from_numpy(read_image(Path(r["source"]))).permute(2, 0, 1), (32, 40)
        )
        src = src.permute(1, 2, 0).numpy()
        assert img.shape == (32, 40, 3) and mask.shape == (32, 40) and mask.any()
        assert np.abs(img[~mask] - src[~mask]).max() < 1 / 255 + 1e-6  # the rest is kept
        assert np.abs(img[mask] - src[mask]).mean() > 0.01  # the defect is painted
    page = (out / "gallery.html").read_text()
    assert page.count("<img") == 15 and "data:image/png;base64," in page
    assert kdad("synth", "sample", "--model", str(run), "--out", str(out)).returncode == 2


def test_interrupted_ddpm_training_resumes_to_the_unbroken_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_mvtec(tmp_path / "data", n_train=8)

    def cfg(out: str, **kw: int) -> DiffusionConfig:
        ddpm = DDPMOptions(crop=16, width=8, levels=2)
        kw = {"steps": 6, "batch_size": 4, "save_every": 2} | kw
        data_cfg = DataConfig(path=str(data), image_size=32)
        return DiffusionConfig(data=data_cfg, ddpm=ddpm, out=out, **kw)

    unbroken, _ = load_ddpm(train_ddpm(cfg(str(tmp_path / "a")), progress=False))
    loss, calls = DDPM.loss, []

    def interrupted(self: DDPM, x0: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:  # Ctrl-C during step 5: steps 1-4 were saved at step 4
            raise KeyboardInterrupt
        return loss(self, x0)

    monkeypatch.setattr(DDPM, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(cfg(str(tmp_path / "b")), progress=False)
    monkeypatch.setattr(DDPM, "loss", loss)
    partial = tmp_path / "b" / "ddpm.partial.pt"
    assert partial.is_file() and not (tmp_path / "b" / "ddpm.pt").exists()
    with pytest.raises(KdadError, match=r"partial\.pt: an interrupted DDPM training"):
        train_ddpm(cfg(str(tmp_path / "b"), steps=8), progress=False)
    resumed, _ = load_ddpm(train_ddpm(cfg(str(tmp_path / "b")), progress=False))
    old = torch.load(tmp_path / "a" / "ddpm.pt", weights_only=True)
    old["config"]["ddpm"] = {"image_size": 64, "channels": 3, "width": 8, "levels": 2}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(KdadError, match=r"old\.pt: a DDPM of whole 64x64 images"):
        load_ddpm(tmp_path / "old.pt")
    assert not partial.exists()
    a, b = unbroken.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_set_defects_are_seeded_and_bank_keeps_out_held_images(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "data", n_train=12)
    cfg = RunConfig()
    cfg.data.path, cfg.data.image_size, cfg.model.name = str(data), 32, "dest_ddpm"
    cfg.model.options = {"defects": "perlin"}
    ds, _ = datasets(cfg, model_from_config(cfg.model, pretrained=False))
    assert isinstance(ds, SyntheticTrainSet)
    ds.set_epoch(0)
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    ds.set_epoch(1)
    later = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, later))
    flawed = [x for x in first if x["mask"].any()]
    assert 0 < len(flawed) < len(first)  # some images, not all, carry a defect
    for x in first:
        outside = x["mask"][None].expand_as(x["image"]) == 0
        assert torch.equal(x["image"][outside], x["clean"][outside])

    fit, held = training_samples(cfg.data)
    folder = tmp_path / "bank"
    folder.mkdir()
    with open(folder / "synthetic.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "source"])
        w.writerow(["a.png", "a_mask.png", str(held[0].path)])
        w.writerow(["b.png", "b_mask.png", str(fit[0].path)])
    assert [b[2] for b in read_bank(folder, fit)] == [fit[0].path]
    with pytest.raises(KdadError, match="none of its 2 defects"):
        read_bank(folder, fit[1:])
    with pytest.raises(KdadError, match=r"no synthetic\.csv"):
        read_bank(tmp_path, fit)


def test_bank_share_mixes_painted_and_perlin_defects(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "data", n_train=12)
    fit, _ = training_samples(DataConfig(path=str(data), image_size=32))
    folder = tmp_path / "bank"
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(folder / "white.png")
    square = np.zeros((32, 32), np.uint8)
    square[8:24, 8:24] = 255
    Image.fromarray(square).save(folder / "white_mask.png")
    with open(folder / "synthetic.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "source"])
        w.writerows(["white.png", "white_mask.png", str(s.path)] for s in fit)
    bank = read_bank(folder, fit)

    def from_bank(share: float) -> list[bool]:
        ds = SyntheticTrainSet(
            fit, 32, (0, 0, 0), (1, 1, 1), defect_prob=1.0, bank=bank, bank_share=share
        )
        ds.set_epoch(0)
        return [bool((ds[i]["image"] == 1).all()) for i in range(len(ds))]

    assert all(from_bank(1.0)) and not any(from_bank(0.0))
    mixed = from_bank(0.5)
    assert any(mixed) and not all(mixed)
    cfg = RunConfig()
    cfg.data.path, cfg.data.image_size, cfg.model.name = str(data), 32, "dest_ddpm"
    cfg.model.options = {"bank_share": 1.5}
    with pytest.raises(KdadError, match=r"bank_share must be in \[0, 1\], got 1.5"):
        model_from_config(cfg.model, pretrained=False)


def _dest_run(tmp_path: Path) -> tuple[RunConfig, list]:
    """A DeST-DDPM run's config at 64 px on a generated dataset, and its fitting images."""
    data = make_mvtec(tmp_path / "data", n_train=12)
    cfg = RunConfig()
    cfg.data.path, cfg.data.image_size, cfg.model.name = str(data), 64, "dest_ddpm"
    return cfg, training_samples(cfg.data)[0]


def test_perlin_training_defects_come_in_many_sizes(tmp_path: Path) -> None:
    cfg, fit = _dest_run(tmp_path)
    ds, _ = datasets(cfg, model_from_config(cfg.model, pretrained=False))
    assert ds.thresholds == (0.5, 0.5)  # the default: DRAEM's
    cfg.model.options = {"mask_thresholds": [0.1, 0.6]}
    ds, _ = datasets(cfg, model_from_config(cfg.model, pretrained=False))
    assert ds.thresholds == (0.1, 0.6)  # what the option trains on

    def areas(thresholds: tuple[float, float]) -> np.ndarray:
        ds = SyntheticTrainSet(
            fit, 64, (0, 0, 0), (1, 1, 1), defect_prob=1.0, thresholds=thresholds
        )
        out = []
        for epoch in range(4):
            ds.set_epoch(epoch)
            out += [ds[i]["mask"].mean().item() for i in range(len(ds))]
        return np.array(out)

    wide, draem = areas(ds.thresholds), areas((0.5, 0.5))
    assert len(wide) >= 40 and (wide > 0).all() and (draem > 0).all()
    assert draem.mean() < 0.07 < 0.09 < wide.mean()  # DRAEM's 3-8% against up to 37%
    assert wide.max() > 0.25
    for bad in ([0.6, 0.1], [0.1, 0.9], 0.3, ["a", "b"]):
        cfg.model.options = {"mask_thresholds": bad}
        with pytest.raises(KdadError, match=r"mask_thresholds must be \[lo, hi\]"):
            model_from_config(cfg.model, pretrained=False)


@pytest.mark.slow
def test_dest_ddpm_trains_on_painted_defects(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "data", n_train=12)
    run, bank = tmp_path / "ddpm", tmp_path / "defects"
    assert (
        kdad(
            "synth",
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--image-size",
            "32",
            "--crop",
            "16",
            "--steps",
            "3",
            "--no-progress",
        ).returncode
        == 0
    )
    assert (
        kdad(
            "synth",
            "sample",
            "--model",
            str(run),
            "--out",
            str(bank),
            "--count",
            "4",
            "--no-progress",
        ).returncode
        == 0
    )
    proc = kdad(
        "train",
        "--data",
        str(data),
        "--model",
        "dest_ddpm",
        "--option",
        "defects=ddpm",
        "--option",
        f"ddpm_samples={bank}",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "defects: ddpm" in cfg and str(bank) in cfg
    bad = kdad(
        "train",
        "--data",
        str(data),
        "--model",
        "dest_ddpm",
        "--option",
        "defects",
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


@pytest.mark.slow
def test_dest_ddpm_paints_its_own_bank_when_asked_and_reuses_it(tmp_path: Path, capfd) -> None:
    import kdad as api

    data = make_mvtec(tmp_path / "data", n_train=12)
    settings = dict(model="dest_ddpm", batch_size=4, image_size=32, progress=True)
    plain = tmp_path / "plain"  # the default: Perlin defects, no DDPM
    with pytest.warns(KdadWarning, match="head gets"):
        api.train(data=data, epochs=1, out=plain, **settings)
    assert "DDPM" not in capfd.readouterr().err
    assert not (plain / "ddpm").exists() and not (plain / "defects").exists()

    run = tmp_path / "run"
    tiny = {"defects": "ddpm", "ddpm_steps": 3, "ddpm_count": 4}
    with pytest.warns(KdadWarning, match="head gets"):
        api.train(data=data, options=tiny, epochs=1, out=run, **settings)
    err = capfd.readouterr().err
    fit, _ = training_samples(DataConfig(path=str(data)))
    assert f"training a DDPM of the {len(fit)} good images (3 steps)" in err
    assert f"painting 4 defects into {run / 'defects'}" in err
    made = [run / "ddpm" / "ddpm.pt", run / "defects" / "synthetic.csv"]
    with open(made[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["source"] for r in rows} <= {str(s.path.resolve()) for s in fit}
    stamps = [p.stat().st_mtime_ns for p in made]

    with pytest.warns(KdadWarning, match="head gets"):
        api.train(epochs=2, out=run, resume=True, **settings)  # reuses the bank
    err = capfd.readouterr().err
    assert "DDPM" not in err and "painting" not in err
    assert [p.stat().st_mtime_ns for p in made] == stamps

    later = tmp_path / "later"  # a later run naming the bank reuses it too
    bank = {"defects": "ddpm", "ddpm_samples": str(run / "defects")}
    with pytest.warns(KdadWarning, match="head gets"):
        api.train(data=data, options=bank, epochs=2, out=later, **settings)
    assert "painting" not in capfd.readouterr().err and not (later / "ddpm").exists()
    assert str(run / "defects") in (later / "config.yaml").read_text()


def test_a_second_heads_phase_trains_on_wide_perlin_defects(tmp_path: Path) -> None:
    cfg, fit = _dest_run(tmp_path)
    ds, _ = datasets(cfg, model_from_config(cfg.model, pretrained=False))
    assert ds.wide is None
    cfg.model.options = {"wide_head": [0.1, 0.6]}
    ds, _ = datasets(cfg, model_from_config(cfg.model, pretrained=False))
    assert ds.thresholds == (0.5, 0.5) and ds.wide == (0.1, 0.6)

    def areas(wide: tuple[float, float] | None, phase: str) -> np.ndarray:
        ds = SyntheticTrainSet(fit, 64, (0, 0, 0), (1, 1, 1), defect_prob=1.0, wide=wide)
        out = []
        for epoch in range(4):
            ds.set_epoch(epoch, phase)
            out += [ds[i]["mask"].mean().item() for i in range(len(ds))]
        return np.array(out)

    first, second = areas((0.1, 0.6), "head"), areas((0.1, 0.6), "wide")
    assert first.mean() < 0.07 < 0.09 < second.mean()  # DRAEM's 3-8% against up to 37%
    # the first head's phase draws the defects a one-head run draws, epoch by epoch
    assert np.array_equal(first, areas(None, "head"))
    assert np.array_equal(areas(None, "wide"), first)  # no second head: no wide defects
