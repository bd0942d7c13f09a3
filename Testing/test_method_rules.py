"""The exact rules of METHOD.md ("Exact rules settled by comparing with the reference code"), one test each, on
real slices from ../shared/data.

Each expected value is derived in the test from the rule as written (explicit loops, sorted lists), not by
calling the code under test a second time. What these tests cannot show: that the rules give better masks;
the accuracy benchmark (scripts/bench_accuracy.py) measures that.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_data
from scipy import ndimage
from skimage import exposure

from clisc.cohort.cases import body_mask, minmax_slices, preprocess
from clisc.cohort.pseudo_labels import equalised_rgb, slice_prompt
from clisc.cohort.s3f import rank_cases, self_consistency
from clisc.cohort.slice_labels import smooth_slice_labels
from clisc.profiles import choose_profile
from clisc.prompts import coarse_mask, sam_prompt
from clisc.readers import read_volume
from clisc.saliency.vision_tower import upsample


@pytest.fixture(scope="module")
def brats():
    """pat0001: the pre-processed FLAIR (as the cohort pipeline sees it), its body, and the tumour, cropped alike."""
    volume = read_volume(shared_data("brats2015/pat0001/flair.nii.gz"))
    truth = read_volume(shared_data("brats2015/pat0001/label.nii.gz")).array > 0
    image, crop = preprocess(volume)
    return image, body_mask(volume.array)[crop], truth[crop]


def middle_tumour_slice(truth: np.ndarray) -> int:
    tumour = np.flatnonzero(truth.any(axis=(1, 2)))
    return int(tumour[len(tumour) // 2])


# ---- A.1 β per target ---------------------------------------------------------------------------------------

def test_beta_is_two_for_a_brain_tumour_and_one_for_breast_ultrasound():
    """MedCLIP-SAMv2's v2 scripts: β 2.0 for brain MRI, 1.0 for breast ultrasound and elsewhere."""
    busi = read_volume(shared_data("busi/malignant/malignant (1).png"))
    assert choose_profile("brain tumor")[0].beta == 2.0
    assert choose_profile("breast tumor", two_dimensional=min(busi.array.shape) == 1)[0].beta == 1.0
    assert choose_profile("liver")[0].beta == 1.0


# ---- A.2 coarse mask ------------------------------------------------------------------------------------------

def two_means_threshold(values: np.ndarray) -> float:
    """Lloyd's k-means with k = 2 on 1D values from the extremes: the midpoint of the converged centroids."""
    low, high = values.min(), values.max()
    for _ in range(100):
        cut = (low + high) / 2
        low, high = values[values <= cut].mean(), values[values > cut].mean()
    return (low + high) / 2


def test_coarse_mask_clusters_the_map_at_256_and_comes_back_by_nearest_neighbour(brats):
    """A smooth real map: the blurred tumour of a BraTS slice (the brain crop is not 256 px on either side)."""
    _, _, truth = brats
    k = middle_tumour_slice(truth)
    saliency = ndimage.gaussian_filter(truth[k].astype(float), 6)
    saliency /= saliency.max()
    height, width = saliency.shape
    assert height != 256 and width != 256
    # pixel-centre nearest neighbour, written out: output t takes source floor((t + 0.5) * source / target)
    grid = np.array([[saliency[int((r + 0.5) * height / 256), int((c + 0.5) * width / 256)] for c in range(256)]
                     for r in range(256)])
    foreground = grid > two_means_threshold(grid.ravel())
    back = np.array([[foreground[int((r + 0.5) * 256 / height), int((c + 0.5) * 256 / width)]
                      for c in range(width)] for r in range(height)])
    components, count = ndimage.label(back, structure=np.ones((3, 3)))
    largest = components == 1 + np.argmax(np.bincount(components.ravel())[1:])
    mask = coarse_mask(saliency, "kmeans", components=1)
    assert count >= 1 and np.array_equal(mask, largest)
    # the round trip by pixel centres does not move a mask; OpenCV's floor rule (the reference's) would
    tumour = truth[k]
    there = tumour[np.ix_((2 * np.arange(256) + 1) * height // 512, (2 * np.arange(256) + 1) * width // 512)]
    back = there[np.ix_((2 * np.arange(height) + 1) * 256 // (2 * height), (2 * np.arange(width) + 1) * 256 // (2 * width))]
    floor_there = tumour[np.ix_(np.arange(256) * height // 256, np.arange(256) * width // 256)]
    floor_back = floor_there[np.ix_(np.arange(height) * 256 // height, np.arange(width) * 256 // width)]
    centre = np.argwhere(tumour).mean(axis=0)
    assert np.abs(np.argwhere(back).mean(axis=0) - centre).max() < 0.1
    assert np.abs(np.argwhere(floor_back).mean(axis=0) - centre).max() > 0.2


# ---- A.3 points mode ----------------------------------------------------------------------------------------

def test_points_mode_samples_ten_positives_inside_and_negatives_outside_the_mask_seeded():
    """A real BUSI lesion as the coarse mask; the candidates of each kind in row-major order, drawn without
    replacement by the seeded generator; negatives come from outside the mask, box included."""
    truth = read_volume(shared_data("busi/malignant/malignant (1)_mask.png")).array[0] > 0
    prompt = sam_prompt(truth, "points", negative_points=10, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    inside = [(c, r) for r in range(truth.shape[0]) for c in range(truth.shape[1]) if truth[r, c]]
    outside = [(c, r) for r in range(truth.shape[0]) for c in range(truth.shape[1]) if not truth[r, c]]
    positives = [inside[i] for i in rng.choice(len(inside), 10, replace=False)]
    negatives = [outside[i] for i in rng.choice(len(outside), 10, replace=False)]
    assert prompt.points.astype(int).tolist() == [list(p) for p in positives + negatives]
    assert prompt.labels.tolist() == [1] * 10 + [0] * 10


# ---- A.1 gScoreCAM channel masks ------------------------------------------------------------------------------

def test_gscorecam_channel_maps_are_upsampled_with_corners_aligned(brats):
    """A 14×14 patch grid taken from a real slice, bilinear to 224 with align_corners: output pixel t samples
    source t · 13 / 223, so the corners are the grid's corners."""
    image, _, truth = brats
    k = middle_tumour_slice(truth)
    grid = torch.as_tensor(image[k][::10, ::10][:14, :14].copy())[None]
    up = upsample(grid, (224, 224), align_corners=True)[0].numpy()
    g = grid[0].numpy()
    for t in (0, 100, 223):
        for u in (0, 57, 223):
            y, x = t * 13 / 223, u * 13 / 223
            y0, x0 = min(int(y), 12), min(int(x), 12)
            fy, fx = y - y0, x - x0
            expected = ((1 - fy) * (1 - fx) * g[y0, x0] + (1 - fy) * fx * g[y0, x0 + 1]
                        + fy * (1 - fx) * g[y0 + 1, x0] + fy * fx * g[y0 + 1, x0 + 1])
            assert up[t, u] == pytest.approx(expected, abs=1e-4)


# ---- B.2 slice-label smoothing ---------------------------------------------------------------------------------

def test_a_tie_between_neighbours_makes_the_slice_normal(brats):
    """CLIP probabilities from the real tumour's slice range (0.9 inside, 0.1 outside). With every slice kept,
    ±5 kept positions and |Δz| ≤ 6, the first and the last tumour slice each have 5 tumour and 5 normal
    neighbours: a tie, so they become normal; every other slice keeps its label (it has a majority for it)."""
    _, _, truth = brats
    tumour = truth.any(axis=(1, 2))
    first, last = np.flatnonzero(tumour)[[0, -1]]
    assert tumour[first:last + 1].all() and last - first >= 6 and first >= 6 and last <= len(tumour) - 7
    expected = tumour.astype(int)
    expected[[first, last]] = 0
    assert smooth_slice_labels(np.where(tumour, 0.9, 0.1)).tolist() == expected.tolist()


# ---- B.5 SAM image and positive points ---------------------------------------------------------------------------

def test_sam_image_is_equalised_with_the_lowest_grey_level_at_zero(brats):
    image, _, truth = brats
    k = middle_tumour_slice(truth)
    slice_uint8 = (minmax_slices(image[k:k + 1])[0] * 255).round().astype(np.uint8)
    levels, counts = np.unique(slice_uint8, return_counts=True)
    cdf = np.cumsum(counts)
    lut = {level: round((c - cdf[0]) / (slice_uint8.size - cdf[0]) * 255) for level, c in zip(levels, cdf)}
    expected = np.vectorize(lut.get)(slice_uint8)
    equalised = equalised_rgb(slice_uint8)
    assert np.array_equal(equalised[..., 0], expected) and np.array_equal(equalised[..., 2], expected)
    background = slice_uint8 == levels[0]
    assert (equalised[..., 0][background] == 0).all()
    # skimage's equalize_hist, the rule's counter-example, lifts the same background to its CDF value
    assert (exposure.equalize_hist(slice_uint8, nbins=256)[background] * 255).round().min() > 30


def test_positive_points_are_the_bright_mask_pixels_above_six_tenths_of_the_mask_maximum(brats):
    """On a real tumour slice with the tumour as the CAM mask: intensity = the slice min-max scaled in float;
    candidates = mask pixels with intensity >= 0.6 × the mask's maximum, row-major; indices 0, n/3, n/2, 2n/3, n-1."""
    image, _, truth = brats
    k = middle_tumour_slice(truth)
    plane = image[k].astype(np.float64)
    intensity = (plane - plane.min()) / (plane.max() - plane.min())
    mask = truth[k]
    cut = 0.6 * max(intensity[r, c] for r, c in zip(*np.nonzero(mask)))
    candidates = [(c, r) for r in range(mask.shape[0]) for c in range(mask.shape[1])
                  if mask[r, c] and intensity[r, c] >= cut]
    n = len(candidates)
    expected = [candidates[i] for i in (0, n // 3, n // 2, 2 * n // 3, n - 1)]
    prompt = slice_prompt(minmax_slices(image[k:k + 1], np.float64)[0], mask)
    assert prompt.points[:5].astype(int).tolist() == [list(p) for p in expected]
    # the old cut, min + 0.6 × range inside the mask, picks other points on this slice
    old_cut = intensity[mask].min() + 0.6 * (intensity[mask].max() - intensity[mask].min())
    assert sum(intensity[r, c] >= old_cut for c, r in candidates) != n


# ---- B.7 S3F ----------------------------------------------------------------------------------------------------

class BoxSegmenter:
    """SAM's mask = its box prompt, filled (so Ŝ is the per-slice bounding box of S)."""

    batch_size = 8

    def embed(self, images):
        return torch.zeros(len(images), 1)

    def predict(self, embedding, shape, prompt):
        x0, y0, x1, y1 = prompt.boxes[0].astype(int)
        mask = np.zeros(shape, bool)
        mask[y0:y1 + 1, x0:x1 + 1] = True
        return mask


def test_s3f_similarity_restricts_the_resegmentation_to_the_body(brats):
    """S = the real tumour (one component); Ŝ = its per-slice boxes, restricted to the real body mask, where the
    body is cut in half so that the restriction matters."""
    image, body, truth = brats
    components, _ = ndimage.label(truth, structure=np.ones((3, 3, 3)))
    largest = components == 1 + np.argmax(np.bincount(components.ravel())[1:])
    half_body = body.copy()
    columns = np.flatnonzero(largest.any(axis=(0, 1)))
    half_body[:, :, columns[len(columns) // 2]:] = False
    boxes = np.zeros_like(largest)
    for k in np.flatnonzero(largest.any(axis=(1, 2))):
        rows, cols = np.nonzero(largest[k])
        boxes[k, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    resegmented = boxes & half_body
    expected = 2 * (resegmented & largest).sum() / (resegmented.sum() + largest.sum())
    _, similarity = self_consistency(largest, image, BoxSegmenter(), half_body)
    assert similarity == pytest.approx(expected)


def test_s3f_keeps_floor_n_keep_and_drops_empty_predictions():
    """N = 5 ranked cases, keep 0.5: floor(2.5) = 2 kept; the empty case is neither ranked nor counted."""
    rows = rank_cases({"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5, "empty": None}, keep=0.5)
    assert [row.case_id for row in rows if row.kept] == ["a", "b"]
    assert [(row.rank, row.kept) for row in rows if row.case_id == "empty"] == [(None, False)]
