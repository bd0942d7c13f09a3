"""Dice, HD95 (mm) and NSD on constructed masks whose values are known by hand, including anisotropic voxels
and the rule for empty masks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clisc.metrics import EMPTY_CASE_RULE, dice, evaluate, hd95, image_diagonal_mm, nsd


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


def test_nsd_counts_the_surface_voxels_within_the_tolerance_in_mm():
    a, b = boxes(2)
    spacing = (4.0, 4.0, 1.5)
    # Each 3×5×5 box has 66 surface voxels (75 minus the 1×3×3 inside). Distances (mm) from those of one box to
    # the other's surface: 36 shared voxels (the 12-voxel ring of the 3 overlapping i-columns) at 0; the ring of
    # the next column at 1 voxel along i (1.5 mm); the outer i face (15) and the 3 inside voxels of the inner
    # face at 2 voxels along i (3 mm; along k or j they would be 4 mm).
    assert nsd(a, b, spacing, tolerance_mm=1.0) == pytest.approx(36 / 66)
    assert nsd(a, b, spacing, tolerance_mm=2.0) == pytest.approx(48 / 66)
    assert nsd(a, b, spacing, tolerance_mm=3.0) == pytest.approx(1.0)
    # In voxels (unit spacing) the same boxes are all within 2 of each other.
    assert nsd(a, b, (1.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(1.0)
    assert hd95(a, b, spacing) == pytest.approx(3.0)


def test_empty_masks_follow_the_documented_rule():
    a, _ = boxes()
    empty = np.zeros_like(a)
    spacing = (3.0, 1.0, 1.0)
    diagonal = math.sqrt(30 ** 2 + 20 ** 2 + 20 ** 2)
    assert image_diagonal_mm(a.shape, spacing) == pytest.approx(diagonal)
    assert (dice(empty, a), hd95(empty, a, spacing)) == (0.0, pytest.approx(diagonal))
    assert (dice(a, empty), hd95(a, empty, spacing)) == (0.0, pytest.approx(diagonal))
    assert (dice(empty, empty), hd95(empty, empty, spacing)) == (1.0, 0.0)
    assert (nsd(empty, a, spacing), nsd(a, empty, spacing), nsd(empty, empty, spacing)) == (0.0, 0.0, 1.0)
    assert "Dice 0, NSD 0" in EMPTY_CASE_RULE and "diagonal" in EMPTY_CASE_RULE and "NSD 1" in EMPTY_CASE_RULE


def test_evaluate_reports_both_metrics_and_sizes():
    a, b = boxes(2)
    result = evaluate(a, b, (1.0, 1.0, 1.0))
    assert result == {"dice": pytest.approx(0.6), "hd95_mm": pytest.approx(2.0), "nsd": pytest.approx(1.0),
                      "predicted_voxels": 75, "truth_voxels": 75}
    assert evaluate(a, b, (1.0, 1.0, 1.0), nsd_tolerance_mm=0.5)["nsd"] == pytest.approx(36 / 66)
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, b[:-1])
