"""A trained model ready for the line: scores, calibrated decisions, maps, masks, instances."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kdad.backbones import get_spec
from kdad.config import DataConfig, RunConfig, ScoreConfig
from kdad.data.dataset import ImageDataset, input_hw, preprocess
from kdad.data.io import read_image
from kdad.data.layouts import Sample, collect_images, find_samples
from kdad.engine.calibrate import calibrate, f1_threshold, normalise
from kdad.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from kdad.engine.distributed import barrier, ensure_group, resolve_device
from kdad.engine.evaluate import evaluate_model
from kdad.engine.infer import fit_normal
from kdad.engine.runtime import Scorer, make_scorer
from kdad.errors import KdadError, KdadWarning
from kdad.models import KDModel, model_from_config
from kdad.outputs import (
    ImageResult,
    PredictionWriter,
    defect_mask,
    find_instances,
    merge_shards,
    unique_names,
    upsample_map,
)


@dataclass
class Prediction:
    """One image at model resolution: raw map (h, w) and score; with calibration also the
    normalised score in [0, 1] (0.5 = threshold) and the decision."""

    path: str
    score: float
    anomaly_map: np.ndarray
    normalised_score: float | None = None
    decision: str | None = None  # "ok" or "defect"


class Detector:
    """A model, its config and its calibration (None for a checkpoint that has none), scoring on
    the runtime ``runtime`` (engine/runtime.py; auto: the model's graph in onnxruntime on the
    CPU, PyTorch on a GPU)."""

    def __init__(
        self,
        model: KDModel,
        cfg: RunConfig,
        checkpoint: dict[str, Any],
        runtime: str = ScoreConfig.runtime,
    ) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.runtime = runtime
        self._scorer: Scorer | None = None
        self.calibration: dict[str, Any] | None = checkpoint.get("calibration")
        spec = get_spec(cfg.model.backbone)
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)
        self.device = next(model.parameters()).device
        if self.calibration is None:
            warnings.warn(
                f"{checkpoint.get('path', 'checkpoint')} has no calibration (trained without "
                "held-out images, interrupted before validating, or older): scores are raw, "
                "with no decisions or masks",
                KdadWarning,
                stacklevel=3,
            )

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str = ScoreConfig.device,
        runtime: str = ScoreConfig.runtime,
    ) -> Detector:
        """Rebuild the model from a checkpoint's config and state dict (no download needed)."""
        ckpt = load_checkpoint(checkpoint)
        cfg = RunConfig.from_dict(ckpt["config"], ckpt["path"])
        model = model_from_config(cfg.model, pretrained=False)
        load_weights(model, ckpt)
        return cls(model.to(resolve_device(device)), cfg, ckpt, runtime)

    @property
    def scorer(self) -> Scorer:
        """The model on its runtime, made at first use (a new graph takes seconds to write)."""
        if self._scorer is None:
            self._scorer = make_scorer(self.model, input_hw(self.cfg.data.image_size), self.runtime)
        return self._scorer

    def dataset(self, samples: list[Sample]) -> ImageDataset:
        """``samples`` prepared as this model was trained: its image size and normalisation."""
        return ImageDataset(
            samples,
            self.cfg.data.image_size,
            self.mean.flatten().tolist(),
            self.std.flatten().tolist(),
        )

    def use_f1_threshold(self, data: str | Path, layout: str = DataConfig.layout) -> float:
        """Set the image threshold to the F1-best one on a labelled validation folder given
        explicitly (never the test set: that is the caller's promise). Returns it."""
        if self.calibration is None:
            raise KdadError("an F1 threshold needs a calibrated checkpoint (for normalisation)")
        d = self.cfg.data
        samples = find_samples(data, "test", layout, None, d.normal_dir, d.abnormal_dir, d.mask_dir)
        ev = evaluate_model(self.scorer, self.dataset(samples))
        t = f1_threshold(ev.scores, ev.labels)
        low = min(self.calibration["image_low"], t - 1e-6)
        self.calibration = {
            **self.calibration,
            "image_threshold": t,
            "image_low": low,
            "image_threshold_from": f"F1 on {data}",
        }
        return t

    @torch.inference_mode()
    def _run(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        size = self.cfg.data.image_size
        x = torch.stack([preprocess(im, size, self.mean, self.std) for im in images])
        out = self.scorer(x)  # (B, h, w), (B,)
        return out.anomaly_map.numpy(), out.score.numpy()

    def _decide(self, score: float) -> tuple[float | None, str | None]:
        c = self.calibration
        if c is None:
            return None, None
        ns = float(normalise(np.float64(score), c["image_threshold"], c["image_low"]))
        return ns, "defect" if score >= c["image_threshold"] else "ok"

    def predict(
        self, images: Sequence[str | Path | np.ndarray], batch_size: int = ScoreConfig.batch_size
    ) -> list[Prediction]:
        """Score images given as files or float (H, W, 3) arrays in [0, 1]."""
        results = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            arrays = [im if isinstance(im, np.ndarray) else read_image(im) for im in chunk]
            maps, scores = self._run(arrays)
            for im, s, m in zip(chunk, scores, maps):
                name = "" if isinstance(im, np.ndarray) else str(im)
                results.append(Prediction(name, float(s), m, *self._decide(float(s))))
        return results

    def analyse(
        self, path: Path, image: np.ndarray, amap: np.ndarray, score: float, heat: bool = True
    ) -> tuple[ImageResult, np.ndarray | None, np.ndarray | None]:
        """Result, heat (H, W) in [0, 1] and defect mask (H, W) at the image's resolution.

        With calibration the heat is the normalised map (0.5 = pixel threshold, the same scale
        for every image) and the mask is heat >= 0.5 on parts judged defective. Without, the heat
        is the map scaled to its own range (where, not how much) and there is no mask. With
        ``heat`` False, a part judged good gets no heat, and its empty mask costs nothing.
        """
        h, w = image.shape[:2]
        ns, decision = self._decide(score)
        res = ImageResult(str(path), float(score), ns, decision)
        c = self.calibration
        if not heat and decision == "ok":
            return res, None, np.zeros((h, w), bool)
        full = upsample_map(amap, h, w)
        if c is None:
            heat = (full - full.min()) / max(float(full.max() - full.min()), 1e-12)
            return res, heat, None
        heat = normalise(full, c["pixel_threshold"], c["pixel_low"])
        mask = defect_mask(heat, decision == "defect")
        res.instances = find_instances(mask, heat)
        return res, heat, mask

    def predict_files(
        self,
        inputs: Sequence[str | Path],
        out: str | Path,
        batch_size: int = ScoreConfig.batch_size,
        progress: bool = False,
        heatmaps: bool = True,
        masks: bool = True,
    ) -> Path:
        """Score image files and folders (searched recursively, in sorted order), streaming:
        OUT/predictions.csv and .jsonl, and per image OUT/heatmaps/NAME.png and OUT/masks/NAME.png
        at the original resolution (unless ``heatmaps`` or ``masks`` is False), NAME being its
        path relative to the folder named (``day1/cam2/001``), so equal file names in two
        subfolders never overwrite each other.

        An unreadable image gets a line with its error and a warning; the run goes on. Under
        torchrun each rank scores every world-th input; rank 0 then merges the ranks' lines in
        input order (every input exactly once). Several nodes need OUT on a shared filesystem.
        With ``progress``, rank 0 shows a bar of its images on stderr.
        """
        out = Path(out)
        found = collect_images(list(inputs), exclude=out)
        paths = [p for p, _ in found]
        stems = unique_names([name for _, name in found])
        r = ensure_group(self.device)
        mine = list(range(r.rank, len(paths), r.world))
        writer = PredictionWriter(out, r.rank if r.world > 1 else None, heatmaps, masks)
        bar = tqdm(total=len(mine), unit="image", disable=not (progress and r.main))
        try:
            for i in range(0, len(mine), batch_size):
                chunk = [(k, _try_read(paths[k])) for k in mine[i : i + batch_size]]
                ok = [img for _, img in chunk if not isinstance(img, str)]
                maps, scores = self._run(ok) if ok else ([], [])
                j = 0
                for k, img in chunk:  # lines in input order
                    if isinstance(img, str):
                        writer.write(ImageResult(str(paths[k]), error=img), stems[k], k)
                        continue
                    res, heat, mask = self.analyse(
                        paths[k], img, maps[j], float(scores[j]), heat=heatmaps
                    )
                    writer.write(res, stems[k], k, img, heat, mask)
                    j += 1
                bar.update(len(chunk))
        finally:
            bar.close()
            writer.close()
        if r.world > 1:
            barrier()  # every shard written
            if r.main:
                merge_shards(out, r.world, len(paths))
            barrier()
        return out / "predictions.csv"


def recalibrate(
    checkpoint: str | Path,
    false_alarm_rate: float | None = None,
    pixel_quantile: float | None = None,
    device: str = ScoreConfig.device,
) -> dict[str, Any]:
    """Compute a checkpoint's calibration again from its own held-out good images (a new target
    rate, or a checkpoint saved without one), after the model fits them again (what older
    checkpoints lack, e.g. per-scale weights), and write it into the file atomically."""
    with warnings.catch_warnings():  # a missing calibration is what we are here to fix
        warnings.simplefilter("ignore", KdadWarning)
        det = Detector.load(checkpoint, device)
    state = dict(det.checkpoint)
    path = Path(state.pop("path"))
    if not state.get("holdout"):
        raise KdadError(f"{path}: no held-out good images recorded; retrain with --holdout > 0")
    c = det.cfg.calibration
    c.false_alarm_rate = false_alarm_rate or c.false_alarm_rate
    c.pixel_quantile = pixel_quantile or c.pixel_quantile
    good = det.dataset([Sample(Path(p), 0) for p in state["holdout"]])
    fit_normal(det.model, good)
    ev = evaluate_model(det.model, good)
    state["model"] = det.model.state_dict()
    state["calibration"] = calibrate(ev.scores, ev.maps, c.false_alarm_rate, c.pixel_quantile)
    state["config"] = det.cfg.to_dict()
    save_checkpoint(path, state)
    return state["calibration"]


def _try_read(path: Path) -> np.ndarray | str:
    """The image, or its error message (also warned) when it cannot be read."""
    try:
        return read_image(path)
    except KdadError as e:
        warnings.warn(str(e), KdadWarning, stacklevel=3)
        return str(e)
