"""Saliency map → coarse mask → Segment Anything prompts (METHOD.md §A steps 2 and 3).

Coordinates follow segment_anything: a point is (x, y) = (column, row) in pixels of the 2D slice, a box is
(x0, y0, x1, y1) with inclusive pixel bounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from skimage.filters import threshold_isodata, threshold_otsu
from skimage.measure import label


@dataclass
class SamPrompt:
    """What SAM receives for one slice; ``components`` is how many blobs of SAM's mask to keep."""

    boxes: Optional[np.ndarray]   # (N, 4) float, x0 y0 x1 y1
    points: Optional[np.ndarray]  # (P, 2) float, x y
    labels: Optional[np.ndarray]  # (P,) int, 1 foreground, 0 background
    components: int

    def as_dict(self) -> dict:
        return {key: None if value is None else np.asarray(value).tolist()
                for key, value in vars(self).items()}


def largest_components(mask: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest connected components of a boolean mask (2D or 3D, full connectivity)."""
    labels = label(mask, connectivity=mask.ndim)
    if labels.max() <= count:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:count] + 1
    return np.isin(labels, keep)


def coarse_mask(saliency: np.ndarray, method: str = "kmeans", components: int = 1,
                threshold: float = 0.3) -> np.ndarray:
    """Binarise a saliency map (H, W) in [0, 1] and keep its ``components`` largest blobs.

    Methods: "kmeans" (two clusters of saliency values; in 1D that is the ISODATA threshold), "otsu", or
    "fixed" (``threshold``). A flat map gives an empty mask.
    """
    if np.ptp(saliency) < 1e-6:
        return np.zeros(saliency.shape, dtype=bool)
    if method == "kmeans":
        cut = threshold_isodata(saliency)
    elif method == "otsu":
        cut = threshold_otsu(saliency)
    elif method == "fixed":
        cut = threshold
    else:
        raise ValueError(f"unknown coarse-mask method {method!r}; use kmeans, otsu or fixed")
    return largest_components(saliency > cut, components)


def sam_prompt(mask: np.ndarray, prompt_type: str = "box", box_per_component: bool = False,
               positive_points: int = 5, negative_points: int = 0,
               rng: Optional[np.random.Generator] = None) -> Optional[SamPrompt]:
    """SAM prompts from a coarse mask (H, W); None when the mask is empty.

    Args:
        prompt_type: "box", "points" or "both".
        box_per_component: one box per connected component (paired organs) instead of one around all.
        positive_points / negative_points: points sampled inside the mask / outside its bounding box
            (seeded by ``rng``).
    """
    if prompt_type not in ("box", "points", "both"):
        raise ValueError(f"unknown prompt type {prompt_type!r}; use box, points or both")
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
        outside_box = np.ones(mask.shape, dtype=bool)
        x0, y0, x1, y1 = _bounding_box(mask)
        outside_box[y0:y1 + 1, x0:x1 + 1] = False
        outside = np.argwhere(outside_box)[:, ::-1]
        negatives = outside[rng.choice(len(outside), min(negative_points, len(outside)), replace=False)]
        points = np.concatenate([chosen, negatives]).astype(float)
        point_labels = np.r_[np.ones(len(chosen), int), np.zeros(len(negatives), int)]
    return SamPrompt(boxes, points, point_labels, components=int(labels.max()))


def _bounding_box(mask: np.ndarray) -> tuple:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return cols[0], rows[0], cols[-1], rows[-1]
