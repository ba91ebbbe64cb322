"""Benchmark: how far a short DeST-DDPM training drifts when the teacher's features change by
float rounding alone.

Two rewritings of the same arithmetic (another summation order, BatchNorm folded into the
weights) change a teacher's features in the last bits. This trains DeST-DDPM for a few epochs
on Magnetic Tile twice from one seed: once as the code stands, once with every teacher feature
multiplied by ``1 + eps * N(0, 1)`` (a fixed generator), ``eps`` about that rounding. If
the perturbed run drifts as far as two commits' runs do, their difference is rounding, not a
bug. ``--features FILE`` writes the teacher's features of 8 good tiles to FILE, or, where FILE
exists (written at another commit), records how far this commit's are from them:

    PYTHONPATH=/tmp/wt_before/src python bench/float_noise.py --features /tmp/f.npz --skip-train
    python bench/float_noise.py --features /tmp/f.npz --out bench/results/float_noise.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import kdad
from kdad.backbones import get_spec
from kdad.data.dataset import preprocess
from kdad.data.io import read_image
from kdad.models.teacher import Teacher

BACKBONE = "efficientnet_lite0"  # DeST-DDPM's default teacher


def teacher_features(data: str) -> list[np.ndarray]:
    """The default teacher's features of the first 8 good tiles at 256x256, preprocessed as
    training does."""
    spec = get_spec(BACKBONE)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (spec.mean, spec.std))
    files = sorted(Path(data).glob("MT_Free/Imgs/*.jpg"))[:8]
    x = torch.stack([preprocess(read_image(f), 256, mean, std) for f in files])  # (8, 3, 256, 256)
    teacher = Teacher(BACKBONE, None, pretrained=True, weights=None)
    with torch.no_grad():
        return [f.contiguous().numpy() for f in teacher(x)]  # each (8, C, h, w)


def losses(data: str, epochs: int, eps: float, out: Path) -> list[float]:
    """Per-epoch training losses of a short run, teacher features perturbed by ``eps``."""
    forward = Teacher.forward
    g = torch.Generator().manual_seed(123)

    def noisy(self: Teacher, x: torch.Tensor) -> list[torch.Tensor]:
        return [f * (1 + eps * torch.randn(f.shape, generator=g)) for f in forward(self, x)]

    if eps:
        Teacher.forward = noisy
    try:
        ckpt = kdad.train(
            data=data,
            model="dest_ddpm",
            epochs=epochs,
            out=out,
            seed=0,
            progress=False,
            options={"student_share": 0.34, "defects": "perlin"},
        )
    finally:
        Teacher.forward = forward
    history = torch.load(ckpt.parent / "checkpoint.pt", weights_only=True)["history"]
    return [h["loss"] for h in history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eps", type=float, default=3e-6)
    ap.add_argument("--features", type=Path, help="write, or compare with, teacher features")
    ap.add_argument("--skip-train", action="store_true", help="only the features")
    ap.add_argument("--out")
    args = ap.parse_args()
    rounding = None
    if args.features:
        feats = teacher_features(args.data)
        if not args.features.exists():
            np.savez(args.features, *feats)
        else:
            ref = np.load(args.features)
            rounding = [  # mean |difference| / mean |feature|, per stage
                float(np.abs(f - r).mean() / np.abs(r).mean())
                for f, r in zip(feats, (ref[k] for k in ref.files))
            ]
            print("teacher features against the file's: " + ", ".join(f"{r:.1e}" for r in rounding))
    if args.skip_train:
        return
    if not args.out:
        ap.error("--out is required unless --skip-train")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for eps in (0.0, args.eps):
            runs[str(eps)] = losses(args.data, args.epochs, eps, Path(tmp) / f"eps{eps}")
            print(f"eps {eps:g}: losses {runs[str(eps)]}")
    drift = [abs(a - b) / b for a, b in zip(runs[str(args.eps)], runs["0.0"])]
    print("relative drift per epoch: " + ", ".join(f"{d:.2%}" for d in drift))
    write_result(
        args.out,
        {
            "benchmark": "float_noise",
            "epochs": args.epochs,
            "options": {"student_share": 0.34, "defects": "perlin"},
            "eps": args.eps,
            "teacher_rounding": rounding,
            "losses": runs,
            "relative_drift": drift,
        },
    )


if __name__ == "__main__":
    main()
