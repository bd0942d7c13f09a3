"""Adaptive masking data augmentation, AMDA (METHOD.md §B step 4).

Hiding the most discriminative part of an abnormal slice makes the retrained classifier look at the rest of
the object, so its new CAM covers more of it. Normal slices are masked too, at random and over a comparable
area, so that "has a hole" does not become a cue for either class.
"""
from __future__ import annotations

import numpy as np

HIDE_FRACTION = 0.8


def amda_masked_copies(images_uint8: np.ndarray, cams: np.ndarray, cam_masks: np.ndarray, labels: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """Masked copies of training slices.

    An abnormal slice (label 1) with a non-empty CAM mask: in the bounding box B of its mask, with CAM q,
    τ = min_B q + 0.8 (max_B q − min_B q), and the pixels of B with q > τ are set to 0. Every other slice
    (normal, or abnormal without a CAM mask) gets one rectangle set to 0 at a random place, of random aspect
    ratio (1:2 to 2:1) and of area the mean number of pixels hidden in the abnormal slices (no rectangle when
    no slice had a CAM mask).

    Args:
        images_uint8: (N, H, W) uint8 slices.
        cams: (N, H, W) float CAMs; cam_masks: (N, H, W) bool post-processed CAM masks.
        labels: (N,) int slice labels (1 abnormal).
        rng: the source of the random rectangles.

    Returns:
        (N, H, W) uint8, the masked copies (the inputs are not changed).
    """
    copies = images_uint8.copy()
    adaptive = [n for n in range(len(copies)) if labels[n] == 1 and cam_masks[n].any()]
    hidden_areas = []
    for n in adaptive:
        rows, cols = np.nonzero(cam_masks[n])
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        q = cams[n][box]
        hide = q > q.min() + HIDE_FRACTION * (q.max() - q.min())
        copies[n][box][hide] = 0
        hidden_areas.append(int(hide.sum()))
    area = float(np.mean(hidden_areas)) if hidden_areas else 0.0
    for n in sorted(set(range(len(copies))) - set(adaptive)):
        if area > 0:
            _hide_rectangle(copies[n], area, rng)
    return copies


def _hide_rectangle(image: np.ndarray, area: float, rng: np.random.Generator) -> None:
    """Set to 0, in place, a rectangle of about ``area`` pixels at a random place of ``image`` (H, W)."""
    height, width = image.shape
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    rows = int(np.clip(round(np.sqrt(area * aspect)), 1, height))
    cols = int(np.clip(round(area / rows), 1, width))
    top, left = rng.integers(0, height - rows + 1), rng.integers(0, width - cols + 1)
    image[top:top + rows, left:left + cols] = 0
