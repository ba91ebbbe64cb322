"""kdad: unsupervised industrial defect detection by knowledge distillation.

import kdad
ckpt = kdad.train(data="path/to/good_images", epochs=10, out="runs/rd")
detector = kdad.load(ckpt)
results = detector.predict(["part.png"])
metrics = kdad.evaluate(ckpt, data="path/to/test_set")
"""

from kdad.api import Detector, Prediction, evaluate, load, train, train_categories
from kdad.config import RunConfig
from kdad.errors import KdadError

__version__ = "0.1.0"
__all__ = [
    "Detector",
    "KdadError",
    "Prediction",
    "RunConfig",
    "evaluate",
    "load",
    "train",
    "train_categories",
]
