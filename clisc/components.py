"""Connected components of a boolean mask (2D or 3D, full connectivity: 8 neighbours in 2D, 26 in 3D).

One labelling for every rule that keeps some components: a slice's coarse mask and SAM's mask (the K
largest), the zero-shot 3D rule (the K largest, or those of at least a size) and the cohort's CAM mask
(those of at least a third of the largest).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from skimage.measure import label


def keep_components(mask: np.ndarray, keep: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The components of ``mask`` that ``keep`` chooses: it maps their sizes (C,) in pixels or voxels, in label
    order, to (C,) bool. A mask without components comes back empty."""
    labels = label(mask, connectivity=mask.ndim)
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.size == 0:
        return np.zeros(mask.shape, dtype=bool)
    kept = np.asarray(keep(sizes), dtype=bool)
    if kept.all():
        return labels > 0
    return np.isin(labels, np.flatnonzero(kept) + 1)


def largest_components(mask: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest components of ``mask``."""

    def largest(sizes: np.ndarray) -> np.ndarray:
        chosen = np.zeros(len(sizes), dtype=bool)
        chosen[np.argsort(sizes)[::-1][:count]] = True
        return chosen

    return keep_components(mask, largest)


def components_of_at_least(mask: np.ndarray, size: int) -> np.ndarray:
    """The components of ``mask`` of ``size`` pixels or voxels or more."""
    return keep_components(mask, lambda sizes: sizes >= size)
