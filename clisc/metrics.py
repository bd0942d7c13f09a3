"""Segmentation metrics in physical units: Dice, the 95th-percentile Hausdorff distance (HD95, mm) and the
normalised surface Dice (NSD) at a tolerance in mm.

Masks are (K, J, I) arrays, as `clisc.volume.Volume` holds them; ``spacing`` is the voxel size along
(k, j, i) in millimetres (``volume.spacing[::-1]``). HD95 is MONAI's symmetric 95th percentile of the
distances between the two masks' surfaces, with the voxel spacing. NSD is MONAI's surface Dice: the fraction
of both surfaces (their boundary voxels) lying within the tolerance of the other surface.

Empty masks have no surface, so HD95 and NSD are undefined for them; `EMPTY_CASE_RULE` says how they are
scored.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

EMPTY_CASE_RULE = ("an empty prediction on a non-empty ground truth (or a non-empty prediction on an empty "
                   "ground truth) scores Dice 0, NSD 0 and HD95 = the image diagonal in mm (the worst distance "
                   "possible in the image); both empty scores Dice 1, NSD 1 and HD95 0")
NSD_TOLERANCE_MM = 2.0


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of ``shape`` voxels of size ``spacing`` (mm, same order)."""
    return float(np.linalg.norm(np.asarray(shape, float) * np.asarray(spacing, float)))


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI 1.5's surface metrics pass get_mask_edges an argument it deprecates, and warn (FutureWarning) about
    their own call, in the middle of `clisc evaluate`'s output: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        yield


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    """(1, 1, K, J, I) float tensor, MONAI's (batch, class, spatial...) layout with one foreground class."""
    return torch.as_tensor(np.asarray(mask, dtype=bool), dtype=torch.float32)[None, None]


def _masks(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as bool arrays; ValueError when their shapes differ."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} and {truth.shape}")
    return prediction, truth


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of the same shape (1 when both are empty)."""
    prediction, truth = _masks(prediction, truth)
    if not prediction.any() and not truth.any():
        return 1.0
    if not prediction.any() or not truth.any():
        return 0.0  # MONAI's ignore_empty would give NaN for an empty truth
    return float(compute_dice(_as_batch(prediction), _as_batch(truth), include_background=True)[0, 0])


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see `EMPTY_CASE_RULE` for empty masks)."""
    prediction, truth = _masks(prediction, truth)
    if not prediction.any() and not truth.any():
        return 0.0
    if not prediction.any() or not truth.any():
        return image_diagonal_mm(truth.shape, spacing)
    with _quiet_monai():
        distance = compute_hausdorff_distance(_as_batch(prediction), _as_batch(truth), include_background=True,
                                              percentile=95, spacing=[float(s) for s in spacing])
    return float(distance[0, 0])


def nsd(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
        tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice in 0..1 at ``tolerance_mm`` (see `EMPTY_CASE_RULE` for empty masks)."""
    prediction, truth = _masks(prediction, truth)
    if not prediction.any() and not truth.any():
        return 1.0
    if not prediction.any() or not truth.any():
        return 0.0
    with _quiet_monai():
        score = compute_surface_dice(_as_batch(prediction), _as_batch(truth), [float(tolerance_mm)],
                                     include_background=True, spacing=[float(s) for s in spacing])
    return float(score[0, 0])


def evaluate(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
             nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict:
    """``{"dice", "hd95_mm", "nsd", "predicted_voxels", "truth_voxels"}`` of one case (NSD at
    ``nsd_tolerance_mm``)."""
    return {"dice": dice(prediction, truth), "hd95_mm": hd95(prediction, truth, spacing),
            "nsd": nsd(prediction, truth, spacing, nsd_tolerance_mm),
            "predicted_voxels": int(np.count_nonzero(prediction)), "truth_voxels": int(np.count_nonzero(truth))}
