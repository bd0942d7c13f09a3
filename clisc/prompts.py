"""Saliency map → coarse mask → Segment Anything prompts (METHOD.md §A steps 2 and 3).

Coordinates follow segment_anything: a point is (x, y) = (column, row) in pixels of the 2D slice, a box is
(x0, y0, x1, y1) in pixels. The box is MedCLIP-SAMv2's (`_bounding_box`): it ends one pixel past the mask's
last column and row, clipped to the last pixel of the slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from skimage.filters import threshold_otsu
from skimage.measure import label

from .components import largest_components
from .profiles import PROMPT_TYPES

KMEANS_GRID = 256  # the side the saliency is clustered at (MedCLIP-SAMv2)


@dataclass
class SamPrompt:
    """What SAM receives for one slice; ``components`` is how many blobs of SAM's mask to keep."""

    boxes: Optional[np.ndarray]   # (N, 4) float, x0 y0 x1 y1 (pixels)
    points: Optional[np.ndarray]  # (P, 2) float, x y
    labels: Optional[np.ndarray]  # (P,) int, 1 foreground, 0 background
    components: int

    def as_dict(self) -> dict:
        return {key: None if value is None else np.asarray(value).tolist()
                for key, value in vars(self).items()}


def coarse_mask(saliency: np.ndarray, method: str = "kmeans", components: int = 1,
                threshold: float = 0.3) -> np.ndarray:
    """Binarise a saliency map (H, W) in [0, 1] and keep its ``components`` largest blobs.

    Methods: "kmeans" (two clusters of saliency values, `two_means_cut`) on the map
    resampled to 256×256 by nearest neighbour (`resize_nearest`), the mask brought back the same way
    (MedCLIP-SAMv2's post-processing); "otsu"; or "fixed" (``threshold``). A flat map gives an empty mask.
    """
    if np.ptp(saliency) < 1e-6:
        return np.zeros(saliency.shape, dtype=bool)
    if method == "kmeans":
        grid = resize_nearest(saliency, (KMEANS_GRID, KMEANS_GRID))
        if np.ptp(grid) < 1e-6:  # what varies fell between the samples
            return np.zeros(saliency.shape, dtype=bool)
        binary = resize_nearest(grid > two_means_cut(grid), saliency.shape)
    elif method == "otsu":
        binary = saliency > threshold_otsu(saliency)
    elif method == "fixed":
        binary = saliency > threshold
    else:
        raise ValueError(f"unknown coarse-mask method {method!r}; use kmeans, otsu or fixed")
    return largest_components(binary, components)


def two_means_cut(values: np.ndarray, iterations: int = 100) -> float:
    """The threshold between the two clusters of k-means (k = 2) on the values, exactly (no histogram bins):
    Lloyd's iterations from the extreme values to convergence, then the midpoint of the two centroids. (The
    reference's scikit-learn KMeans stops at its default tolerance, a few iterations earlier: its clusters
    differ on under 0.1 % of the pixels.)"""
    values = values.ravel()
    low, high = float(values.min()), float(values.max())
    for _ in range(iterations):
        cut = (low + high) / 2
        new = float(values[values <= cut].mean()), float(values[values > cut].mean())
        if new == (low, high):
            break
        low, high = new
    return (low + high) / 2


def resize_nearest(image: np.ndarray, shape: tuple) -> np.ndarray:
    """``image`` (H, W) resized to ``shape`` by nearest neighbour between pixel centres: output pixel t takes
    source pixel floor((t + ½) · source size / target size) on each axis. (OpenCV's INTER_NEAREST, in the
    reference, takes floor(t · source / target), which shifts a resized-and-back mask by up to one pixel
    towards the origin.)"""
    rows, cols = ((2 * np.arange(new) + 1) * old // (2 * new) for old, new in zip(image.shape, shape))
    return image[np.ix_(rows, cols)]


def sam_prompt(mask: np.ndarray, prompt_type: str = "box", box_per_component: bool = False,
               positive_points: int = 10, negative_points: int = 0,
               rng: Optional[np.random.Generator] = None) -> Optional[SamPrompt]:
    """SAM prompts from a coarse mask (H, W); None when the mask is empty.

    Args:
        prompt_type: one of `clisc.profiles.PROMPT_TYPES` (box, points, both).
        box_per_component: one box per connected component (paired organs) instead of one around all.
        positive_points / negative_points: points sampled without replacement inside the mask / outside
            it (MedCLIP-SAMv2's defaults: 10 positives, no negatives), seeded by ``rng``.
    """
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"unknown prompt type {prompt_type!r}; use {', '.join(PROMPT_TYPES)}")
    if not mask.any():
        return None
    rng = rng or np.random.default_rng(0)
    labels = label(mask, connectivity=2)
    regions = [labels == n for n in range(1, labels.max() + 1)] if box_per_component else [mask]
    boxes = points = point_labels = None
    if prompt_type in ("box", "both"):
        boxes = np.array([_bounding_box(region) for region in regions], dtype=float)
        if prompt_type == "both":
            boxes = np.array([_bounding_box(mask)], dtype=float)  # SAM takes points with one box
    if prompt_type in ("points", "both"):
        inside = np.argwhere(mask)[:, ::-1]
        chosen = inside[rng.choice(len(inside), min(positive_points, len(inside)), replace=False)]
        outside = np.argwhere(~mask)[:, ::-1]
        negatives = outside[rng.choice(len(outside), min(negative_points, len(outside)), replace=False)]
        points = np.concatenate([chosen, negatives]).astype(float)
        point_labels = np.r_[np.ones(len(chosen), int), np.zeros(len(negatives), int)]
    return SamPrompt(boxes, points, point_labels, components=int(labels.max()))


def _bounding_box(mask: np.ndarray) -> tuple:
    """MedCLIP-SAMv2's box of a mask (H, W): OpenCV's bounding rectangle (x, y, w, h) as (x, y, x + w, y + h),
    the far corner clipped to (W − 1, H − 1); one pixel wider and taller than the mask's last pixel."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return cols[0], rows[0], min(cols[-1] + 1, width - 1), min(rows[-1] + 1, height - 1)
