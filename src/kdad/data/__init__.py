"""Data: read images and masks, find samples in a layout, serve tensors to the engine."""

from kdad.data.layouts import Sample, find_samples

__all__ = ["Sample", "find_samples"]
