"""Outputs: defect instances and overlays at the original resolution."""

from __future__ import annotations

import numpy as np

from kdad.outputs import find_instances, heatmap_overlay, upsample_map


def test_instances_are_8_connected_regions_with_boxes() -> None:
    mask = np.zeros((10, 20), bool)
    mask[1:4, 2:6] = True  # 12 pixels
    mask[4, 6] = True  # touches the first region diagonally: same instance
    mask[7:9, 15:18] = True  # 6 pixels
    heat = np.where(mask, 0.7, 0.1)
    heat[2, 3] = 0.95
    inst = find_instances(mask, heat)
    assert [i["area"] for i in inst] == [13, 6]
    assert inst[0]["box"] == [2, 1, 7, 5] and inst[1]["box"] == [15, 7, 18, 9]
    assert inst[0]["max_score"] == 0.95 and inst[1]["mean_score"] == 0.7
    assert find_instances(np.zeros((4, 4), bool), np.zeros((4, 4))) == []


def test_overlay_and_upsampling_keep_the_original_size() -> None:
    up = upsample_map(np.ones((8, 8), np.float32), 30, 50)
    assert up.shape == (30, 50) and np.allclose(up, 1)
    img = heatmap_overlay(np.zeros((30, 50, 3)), np.zeros((30, 50)))
    assert img.size == (50, 30)
