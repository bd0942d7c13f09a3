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

    An abnormal slice (label 1) with a non-empty CAM mask: `hide_discriminative`. Every other slice (normal, or
    abnormal without a CAM mask) gets one rectangle set to 0 (`hide_rectangle`) of area the mean number of
    pixels hidden in the abnormal slices (no rectangle when no slice had a CAM mask), in slice order.

    Args:
        images_uint8: (N, H, W) uint8 slices.
        cams: (N, H, W) float CAMs; cam_masks: (N, H, W) bool post-processed CAM masks.
        labels: (N,) int slice labels (1 abnormal).
        rng: the source of the random rectangles.

    Returns:
        (N, H, W) uint8, the masked copies (the inputs are not changed).
    """
    copies = images_uint8.copy()
    adaptive = [n for n in range(len(copies)) if is_adaptive(labels[n], cam_masks[n])]
    area = mean_area([hide_discriminative(copies[n], cams[n], cam_masks[n]) for n in adaptive])
    for n in sorted(set(range(len(copies))) - set(adaptive)):
        hide_rectangle(copies[n], area, rng)
    return copies


def is_adaptive(label: int, cam_mask: np.ndarray) -> bool:
    """Whether a slice is masked where its CAM is highest (abnormal, with a CAM mask) rather than at random."""
    return label == 1 and bool(cam_mask.any())


def hide_discriminative(image: np.ndarray, cam: np.ndarray, cam_mask: np.ndarray) -> int:
    """In the bounding box B of ``cam_mask`` (H, W), with CAM q, τ = min_B q + 0.8 (max_B q − min_B q): set the
    pixels of B with q > τ to 0 in ``image`` (H, W), in place. Returns how many were hidden."""
    rows, cols = np.nonzero(cam_mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    q = cam[box]
    hide = q > q.min() + HIDE_FRACTION * (q.max() - q.min())
    image[box][hide] = 0
    return int(hide.sum())


def mean_area(hidden: list[int]) -> float:
    """The rectangles' area: the mean of the pixels hidden in the adaptive slices (0: no rectangle)."""
    return float(np.mean(hidden)) if hidden else 0.0


def hide_rectangle(image: np.ndarray, area: float, rng: np.random.Generator) -> None:
    """Set to 0, in place, a rectangle of about ``area`` pixels (none for 0) at a random place of ``image``
    (H, W), of random aspect ratio (1:2 to 2:1)."""
    if area <= 0:
        return
    height, width = image.shape
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    rows = int(np.clip(round(np.sqrt(area * aspect)), 1, height))
    cols = int(np.clip(round(area / rows), 1, width))
    top, left = rng.integers(0, height - rows + 1), rng.integers(0, width - cols + 1)
    image[top:top + rows, left:left + cols] = 0
