"""kdad: unsupervised industrial defect detection by knowledge distillation.

import kdad
ckpt = kdad.train(data="path/to/good_images", epochs=10, out="runs/rd")
detector = kdad.load(ckpt)
results = detector.predict(["part.png"])
metrics = kdad.evaluate(ckpt, data="path/to/test_set")

Every other verb of the ``kdad`` command has its function here too (predict, calibrate,
synth_train, synth_sample, bench), except report, export and serve: those names belong to the
submodules kdad.report, kdad.export and kdad.serve, so they are kdad.api.report, .export, .serve.
"""

from kdad.api import (
    Detector,
    Prediction,
    bench,
    calibrate,
    evaluate,
    load,
    predict,
    synth_sample,
    synth_train,
    train,
    train_categories,
)
from kdad.config import RunConfig
from kdad.errors import KdadError

__version__ = "0.1.0"
__all__ = [
    "Detector",
    "KdadError",
    "Prediction",
    "RunConfig",
    "bench",
    "calibrate",
    "evaluate",
    "load",
    "predict",
    "synth_sample",
    "synth_train",
    "train",
    "train_categories",
]
