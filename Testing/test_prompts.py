"""Saliency → coarse mask → SAM prompts, and the connected-component rules they and the 3D step use."""
from __future__ import annotations

import numpy as np
import pytest

from clisc.components import components_of_at_least, keep_components, largest_components
from clisc.profiles import PROMPT_TYPES
from clisc.prompts import coarse_mask, sam_prompt


def blob_map(shape=(60, 80), centres=((20, 25),), radius=8) -> np.ndarray:
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    saliency = np.zeros(shape)
    for row, col in centres:
        saliency = np.maximum(saliency, np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * radius ** 2)))
    return saliency


@pytest.mark.parametrize("method", ["kmeans", "otsu", "fixed"])
def test_coarse_mask_covers_the_salient_blob(method):
    mask = coarse_mask(blob_map(), method)
    rows, cols = np.nonzero(mask)
    assert mask[20, 25] and not mask[50, 70]
    assert abs(rows.mean() - 20) < 1 and abs(cols.mean() - 25) < 1


def test_coarse_mask_keeps_the_requested_number_of_components():
    saliency = blob_map(centres=((20, 20), (40, 60)), radius=5)
    saliency[40:, 40:] *= 0.9
    two = coarse_mask(saliency, components=2)
    assert two[20, 20] and two[40, 60]
    one = coarse_mask(saliency, components=1)
    assert one[20, 20] != one[40, 60]


def test_flat_saliency_gives_no_mask_and_no_prompt():
    mask = coarse_mask(np.full((10, 10), 0.5))
    assert not mask.any()
    assert sam_prompt(mask) is None


def test_box_is_xy_and_ends_one_past_the_mask_clipped_to_the_slice():
    """MedCLIP-SAMv2's box: (x, y, x + w, y + h) of the bounding rectangle, clipped to W - 1, H - 1."""
    mask = np.zeros((50, 60), bool)
    mask[10:21, 30:41] = True
    prompt = sam_prompt(mask, "box")
    assert prompt.boxes.tolist() == [[30, 10, 41, 21]]
    assert prompt.points is None and prompt.components == 1
    mask[10:50, 30:60] = True  # reaches the last row and column
    assert sam_prompt(mask, "box").boxes.tolist() == [[30, 10, 59, 49]]


def test_one_box_per_component_for_paired_organs():
    mask = np.zeros((50, 60), bool)
    mask[5:10, 5:10] = True
    mask[30:40, 40:55] = True
    prompt = sam_prompt(mask, "box", box_per_component=True)
    assert sorted(prompt.boxes.tolist()) == [[5, 5, 10, 10], [40, 30, 55, 40]]
    assert prompt.components == 2
    assert sam_prompt(mask, "box").boxes.tolist() == [[5, 5, 55, 40]]


def test_points_are_inside_negatives_outside_and_seeded():
    mask = np.zeros((50, 60), bool)
    mask[10:30, 20:40] = True
    first = sam_prompt(mask, "points", positive_points=5, negative_points=3, rng=np.random.default_rng(7))
    again = sam_prompt(mask, "points", positive_points=5, negative_points=3, rng=np.random.default_rng(7))
    assert np.array_equal(first.points, again.points)
    assert first.labels.tolist() == [1] * 5 + [0] * 3
    for (x, y), positive in zip(first.points.astype(int), first.labels):
        assert mask[y, x] == bool(positive)


def test_both_gives_one_box_with_points():
    mask = np.zeros((50, 60), bool)
    mask[10:30, 20:40] = True
    prompt = sam_prompt(mask, "both")
    assert prompt.boxes.shape == (1, 4) and prompt.points.shape == (10, 2)  # MedCLIP-SAMv2: 10 positives


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="prompt type"):
        sam_prompt(np.ones((4, 4), bool), "circle")
    with pytest.raises(ValueError, match="coarse-mask method"):
        coarse_mask(blob_map(), "crf")


def test_every_profile_prompt_type_makes_a_prompt():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    assert all(sam_prompt(mask, prompt_type) is not None for prompt_type in PROMPT_TYPES)


def test_components_are_fully_connected_and_kept_by_size():
    """Two blobs touching only at a corner are one component (8 / 26 neighbours); the rules keep by size."""
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = mask[2, 2] = True  # 5 pixels, corner-connected
    mask[5:9, 5:9] = True               # 16 pixels
    mask[0, 9] = True                   # 1 pixel
    assert largest_components(mask, 1).sum() == 16
    assert largest_components(mask, 2).sum() == 21
    assert np.array_equal(largest_components(mask, 5), mask)
    assert components_of_at_least(mask, 5).sum() == 21
    assert keep_components(mask, lambda sizes: sizes * 3 >= sizes.max()).sum() == 16
    volume = np.zeros((3, 3, 3), bool)
    volume[0, 0, 0] = volume[1, 1, 1] = True
    assert largest_components(volume, 1).sum() == 2
    empty = np.zeros((4, 4), bool)
    for kept in (largest_components(empty, 1), components_of_at_least(empty, 1),
                 keep_components(empty, lambda sizes: sizes >= sizes.max())):
        assert kept.dtype == bool and not kept.any()
