"""Dice and HD95 (mm) on constructed masks whose values are known by hand, including anisotropic voxels and
the rule for empty masks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clisc.metrics import EMPTY_CASE_RULE, dice, evaluate, hd95, image_diagonal_mm


def boxes(shift_i: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Two 3×5×5 boxes (K, J, I), the second shifted by ``shift_i`` voxels along i."""
    a = np.zeros((10, 20, 20), bool)
    a[2:5, 5:10, 5:10] = True
    return a, np.roll(a, shift_i, axis=2)


def test_dice_of_overlapping_boxes():
    a, b = boxes(2)
    # overlap 3×5×3 = 45 voxels of 75 each: 2·45 / 150
    assert dice(a, b) == pytest.approx(0.6)
    assert dice(a, a) == pytest.approx(1.0)
    assert dice(a, np.roll(a, 10, axis=2)) == 0.0


def test_hd95_uses_the_spacing_of_each_axis():
    a, b = boxes(2)
    # Faces at i are 2 voxels apart; the shared surface points are at 0: the 95th percentile is the 2 voxels,
    # whose length depends only on the spacing along i (last in (k, j, i) order).
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(4.0)


def test_hd95_between_two_voxels_is_their_distance_in_mm():
    a = np.zeros((4, 4, 6), bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[1, 0, 3] = True  # 1 voxel along k, 3 along i
    spacing = (2.5, 1.0, 0.5)
    assert hd95(a, b, spacing) == pytest.approx(math.hypot(1 * 2.5, 3 * 0.5))
    assert hd95(a, b, spacing[::-1]) == pytest.approx(math.hypot(1 * 0.5, 3 * 2.5))


def test_empty_masks_follow_the_documented_rule():
    a, _ = boxes()
    empty = np.zeros_like(a)
    spacing = (3.0, 1.0, 1.0)
    diagonal = math.sqrt(30 ** 2 + 20 ** 2 + 20 ** 2)
    assert image_diagonal_mm(a.shape, spacing) == pytest.approx(diagonal)
    assert (dice(empty, a), hd95(empty, a, spacing)) == (0.0, pytest.approx(diagonal))
    assert (dice(a, empty), hd95(a, empty, spacing)) == (0.0, pytest.approx(diagonal))
    assert (dice(empty, empty), hd95(empty, empty, spacing)) == (1.0, 0.0)
    assert "Dice 0" in EMPTY_CASE_RULE and "diagonal" in EMPTY_CASE_RULE


def test_evaluate_reports_both_metrics_and_sizes():
    a, b = boxes(2)
    result = evaluate(a, b, (1.0, 1.0, 1.0))
    assert result == {"dice": pytest.approx(0.6), "hd95_mm": pytest.approx(2.0), "predicted_voxels": 75,
                      "truth_voxels": 75}
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, b[:-1])
