"""Proof of no change: train every registered model (and DeST-DDPM on a DDPM-painted defect
bank) a few epochs on a generated tiny dataset with fixed seeds, test it, and write a digest of
each checkpoint's tensors, calibration, losses and test metrics. Run it before and after a
refactor that must not change behaviour: equal digests mean bit-identical results.

    python bench/no_change.py --out bench/results/no_change_before.json
    (refactor)
    python bench/no_change.py --out bench/results/no_change_after.json
    diff bench/results/no_change_before.json bench/results/no_change_after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kdad

# (name, model, options) of every run; the DDPM bank is painted first when an option names it
RUNS = [
    ("rd", "rd", {}),
    ("iig_rd", "iig_rd", {}),
    ("bsdrd", "bsdrd", {}),
    ("stu_seg", "stu_seg", {}),
    ("sspcab_kd", "sspcab_kd", {}),
    ("dest_ddpm", "dest_ddpm", {"defects": "perlin"}),
    ("dest_ddpm_bank", "dest_ddpm", {"defects": "ddpm", "ddpm_samples": "BANK"}),
]


def make_data(root: Path, size: int = 64) -> Path:
    """An MVTec-layout part: striped good images, dark squares with masks as defects."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size]

    def good() -> np.ndarray:
        img = 0.5 + 0.25 * np.sin(2 * np.pi * (x + y) / 8 + rng.uniform(0, 2 * np.pi))
        img = np.clip(img + rng.normal(0, 0.03, (size, size)), 0, 1)
        return (img[:, :, None].repeat(3, 2) * 255).astype(np.uint8)

    def save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)

    for i in range(12):
        save(root / "train" / "good" / f"{i:03d}.png", good())
    for i in range(4):
        save(root / "test" / "good" / f"{i:03d}.png", good())
    for i in range(4):
        img, mask = good(), np.zeros((size, size), np.uint8)
        r, c = rng.integers(0, size - 16, 2)
        img[r : r + 16, c : c + 16] = 20
        mask[r : r + 16, c : c + 16] = 255
        save(root / "test" / "dark" / f"{i:03d}.png", img)
        save(root / "ground_truth" / "dark" / f"{i:03d}_mask.png", mask)
    return root


def digest_tensors(state: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def fingerprint(run_dir: Path, ckpt: Path, data: Path) -> dict:
    """Digests of the kept and the last checkpoint, their calibration and losses, and metrics."""
    out = {}
    for name in ("checkpoint.pt", ckpt.name):
        state = torch.load(run_dir / name, weights_only=True)
        out[name] = {
            "model": digest_tensors(state["model"]),
            "epoch": state["epoch"],
            "calibration": state["calibration"],
            "losses": [h["loss"].hex() for h in state["history"]],
            "val": [h.get("val") for h in state["history"]],
        }
    res = kdad.evaluate(ckpt, data=data, device="cpu")
    out["metrics"] = res["metrics"]
    out["scores"] = [float(r["score"]).hex() for r in res["per_image"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON of digests")
    ap.add_argument("--only", nargs="+", help="run names to run (all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the same arithmetic order on any machine load
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root / "part")
        bank = root / "bank"
        for name, model, options in RUNS:
            if args.only and name not in args.only:
                continue
            if options.get("ddpm_samples") == "BANK":
                synth = [sys.executable, "-m", "kdad", "synth"]
                ddpm = root / "ddpm"
                train = f"--data {data} --out {ddpm} --image-size 32 --steps 3 --width 8"
                sample = f"--model {ddpm} --out {bank} --count 6 --steps 2 --sigma 4"
                for verb, flags in (("train", train + " --batch-size 4"), ("sample", sample)):
                    cmd = [*synth, verb, *flags.split(), "--seed", "0", "--no-progress"]
                    subprocess.run(cmd, check=True)
                options = {**options, "ddpm_samples": str(bank)}
            run_dir = root / name
            ckpt = kdad.train(
                data=str(data),
                model=model,
                options=options,
                image_size=64,
                epochs=4,
                batch_size=4,
                holdout=0.25,
                seed=0,
                device="cpu",
                out=str(run_dir),
                progress=False,
            )
            result[name] = fingerprint(run_dir, Path(ckpt), data)
            print(name, result[name]["checkpoint.pt"]["model"][:16], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
