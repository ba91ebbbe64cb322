"""Data-parallel training and sharded prediction on 2 CPU ranks (gloo), against one process."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_mvtec
from torch.nn.parallel import DistributedDataParallel

from kdad.engine.checkpoint import load_checkpoint
from kdad.engine.distributed import CPUSyncBatchNorm, sync_batchnorm
from kdad.errors import KdadError
from kdad.models import build_model
from kdad.outputs import ImageResult, PredictionWriter, merge_shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rd() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("rd", "efficientnet_lite0", None, {}, False, None).double().train()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One rank: DDP over a synced-BatchNorm RD on its half of a float64 batch of 8."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64)
    model = sync_batchnorm(_rd(), torch.device("cpu"))
    net = DistributedDataParallel(model, find_unused_parameters=True)
    model.loss({}, net(x[rank * 4 : rank * 4 + 4]))["loss"].backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "buffers": dict(model.named_buffers())}, out)
    dist.destroy_process_group()


def test_ddp_with_synced_batchnorm_gives_the_full_batch_gradient(tmp_path: Path) -> None:
    """In float64 (no rounding noise to hide behind), 2 ranks of 4 images give the gradients and
    BatchNorm running statistics of one process on all 8."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    ref = _rd()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64)
    ref.loss({}, ref(x))["loss"].backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == got["grads"].keys() and len(grads) > 100
    for name, g in grads.items():
        err = (got["grads"][name] - g).norm() / g.norm().clamp(min=1e-30)
        assert err < 1e-9 or g.norm() < 1e-12, name  # conv biases before BN: zero gradient
    for name, b in ref.named_buffers():
        assert torch.allclose(got["buffers"][name].double(), b.double(), rtol=1e-10), name


def test_cpu_sync_batchnorm_is_plain_batchnorm_alone() -> None:
    """Without a process group, and in eval mode, it is BatchNorm2d with the same state dict."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    bn.weight.data.uniform_()
    model = sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))
    assert isinstance(model[0], CPUSyncBatchNorm)
    assert model.state_dict().keys() == torch.nn.Sequential(bn).state_dict().keys()
    ref = torch.nn.BatchNorm2d(4)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(6, 4, 5, 5)
    assert torch.equal(model(x), ref(x))
    model.eval(), ref.eval()
    assert torch.equal(model(x), ref(x))


def _kdad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdad", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume_exactly(tmp_path: Path) -> None:
    """``kdad train --nproc 2`` (gloo) against one process with the same global batch of 8:
    the first epoch's loss within 1%, and both runs validated and calibrated. Past the first
    steps float32 rounding, which differs with the reduction order and is amplified by
    near-constant BatchNorm channels at this tiny size, compounds with the CPU's kernels
    (measured: epoch 1 within 0.08% everywhere; epoch 2 0.1-1.2% and the thresholds 0.4-2.5%
    apart, depending on ATEN_CPU_CAPABILITY), so the exact equivalence is the float64 test's
    above. Resuming a 2-rank run under torchrun reproduces the unbroken 2-rank run bit for bit."""
    data = make_mvtec(tmp_path / "data", n_train=18)
    common = ["--data", str(data), "--batch-size", "8", "--image-size", "64", "--val-every", "1"]
    common += ["--model", "rd", "--precision", "fp32", "--no-progress"]
    runs = {}
    for name, extra in [("one", []), ("two", ["--nproc", "2"])]:
        r = _kdad("train", *common, "--epochs", "2", "--out", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("checkpoint:") == 1  # rank 0 alone speaks
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint.pt")
    one, two = runs["one"], runs["two"]
    a, b = one["history"][0]["loss"], two["history"][0]["loss"]
    assert abs(a - b) < 0.01 * a
    for key in ("image_threshold", "pixel_threshold"):
        assert 0 < one["calibration"][key] < float("inf"), key
        assert 0 < two["calibration"][key] < float("inf"), key
    assert len(two["history"]) == 2 and "val" in two["history"][-1]

    half = tmp_path / "half"
    r = _kdad("train", *common, "--epochs", "1", "--out", str(half), "--nproc", "2")
    assert r.returncode == 0, r.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    resume = ["train", "--resume", "--out", str(half), "--epochs", "2", "--no-progress"]
    r = subprocess.run(
        [*torchrun, "-m", "kdad", *resume],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    resumed = load_checkpoint(half / "checkpoint.pt")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in two["history"]]
    for k, v in two["model"].items():
        assert torch.equal(resumed["model"][k], v), k

    r = _kdad("train", *common, "--batch-size", "3", "--out", str(tmp_path / "odd"), "--nproc", "2")
    assert r.returncode != 0
    assert "batch size 3 is not divisible by the 2 ranks" in r.stderr


@pytest.mark.slow
def test_sharded_predict_writes_every_input_once_in_order(tmp_path: Path) -> None:
    """7 inputs (not divisible by 2 ranks; one unreadable, two sharing a name) predicted on 2
    ranks: one merged predictions.csv/.jsonl equal to one process's, no shard left behind."""
    import kdad

    data = make_mvtec(tmp_path / "data", n_train=8)
    run = tmp_path / "run"
    kdad.train(data=data, epochs=1, image_size=64, val_every=1, out=run, progress=False)
    test = data / "test"
    names = ["good/000", "good/001", "good/002", "scratch/000", "scratch/001", "scratch/002"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [str(test / f"{n}.png") for n in names[:4]] + [str(broken)]
    files += [str(test / f"{n}.png") for n in names[4:]]
    args = ["predict", "--checkpoint", str(run), *files]
    one = _kdad(*args, "--out", str(tmp_path / "one"), "--batch-size", "2")
    two = _kdad(*args, "--out", str(tmp_path / "two"), "--batch-size", "2", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    rows = list(csv.DictReader((tmp_path / "two" / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 7
    # Equal to one process's rows; the scores to float rounding, as the shards batch the images
    # otherwise (the 6-digit score of one image differs in its last digit under some kernels).
    alone = list(csv.DictReader((tmp_path / "one" / "predictions.csv").read_text().splitlines()))
    assert [{**r, "score": ""} for r in alone] == [{**r, "score": ""} for r in rows]
    scores = [(float(a["score"]), float(b["score"])) for a, b in zip(alone, rows) if a["score"]]
    assert len(scores) == 6 and all(b == pytest.approx(a, rel=1e-4) for a, b in scores)
    lines = (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(ln)["path"] for ln in lines] == [r["path"] for r in rows]
    assert sum(bool(r["error"]) for r in rows) == 1
    assert [r["path"] for r in rows] == files
    assert len({r["heatmap"] for r in rows if r["heatmap"]}) == 6  # 000.png twice: 000, 000_1
    assert not list((tmp_path / "two").glob(".predictions.rank*"))


def test_merge_refuses_lost_or_duplicated_inputs(tmp_path: Path) -> None:
    for rank, indices in enumerate([[0, 2], [1]]):
        w = PredictionWriter(tmp_path, shard=rank)
        for k in indices:
            w.write(ImageResult(f"img{k}.png", score=float(k)), f"img{k}", k)
        w.close()
    with pytest.raises(KdadError, match="1 of 4 inputs have no prediction"):
        merge_shards(tmp_path, 2, 4)
    w = PredictionWriter(tmp_path, shard=1)
    for k in (1, 2):
        w.write(ImageResult(f"img{k}.png"), f"img{k}", k)
    w.close()
    with pytest.raises(KdadError, match=r"input 2 .* predicted twice"):
        merge_shards(tmp_path, 2, 3)
    w = PredictionWriter(tmp_path, shard=1)
    w.write(ImageResult("img1.png", score=1.0), "img1", 1)
    w.close()
    out = merge_shards(tmp_path, 2, 3)
    assert [r["score"] for r in csv.DictReader(out.read_text().splitlines())] == ["0", "1", "2"]
