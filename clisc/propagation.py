"""Carrying a slice mask to its neighbours with SAM, one slice at a time: the engine behind `Refiner.propagate`
(`clisc.refine`) and the zero-shot pipeline's seeded mode (`clisc.zeroshot.seeded`).

Each next slice is prompted with the box of the previous slice's mask (with a point-trained SAM also a positive
point inside it and a negative point where it shrank) and SAM's own low-resolution logits of the previous slice.
A direction stops at the first slice whose SAM-predicted IoU is below ``min_iou``, whose mask's Dice with the
previous slice's is below ``min_overlap``, or that comes out empty; or at a limit its caller sets (the end of the
volume, a number of slices, the zero-shot gate, another seed's share). A direction that reached a limit can go on
later (`Propagator.advance` again, with a farther limit) exactly as if it had never paused: each step depends only
on the slice before.

Masks are 2D (rows, columns) bool slices along the axis of a `clisc.embeddings.SliceEmbeddings`; boxes and points
are in the pixels of those slices, as `clisc.refine` documents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from scipy import ndimage

from .embeddings import SliceEmbeddings

# The stop rules' defaults (measured: `Refiner.propagate`, README "Refinement accuracy and speed").
MIN_IOU = 0.5
MIN_OVERLAP = 0.3


@dataclass
class DirectionReport:
    """One direction of a propagation. ``first``..``last``: the slices it rewrote (inclusive, in the order
    visited; None when it rewrote none). ``stopped_at``: the slice whose prediction was refused, or None at a
    limit (the end of the volume, ``max_slices``, the zero-shot bound or another seed's slices). ``reason``: why it
    stopped, in words. ``ious`` and ``overlaps``: SAM's predicted IoU and the Dice with the previous slice's mask of
    every slice visited (the refused one last)."""

    direction: str
    first: Optional[int] = None
    last: Optional[int] = None
    stopped_at: Optional[int] = None
    reason: str = ""
    ious: List[float] = field(default_factory=list)
    overlaps: List[float] = field(default_factory=list)


@dataclass
class Propagation:
    """The result of `Refiner.propagate`: ``mask`` (K, J, I) bool, the input mask with the rewritten slices
    replaced; ``reports`` per direction ("up", "down"); ``message`` a one-line summary."""

    mask: np.ndarray
    axis: int
    start: int
    reports: Dict[str, DirectionReport]
    message: str

    @property
    def changed_slices(self) -> List[int]:
        """Every slice index propagation rewrote (the start slice is never rewritten)."""
        indices = []
        for report in self.reports.values():
            if report.first is not None:
                low, high = sorted((report.first, report.last))
                indices.extend(range(low, high + 1))
        return sorted(indices)


@dataclass
class Front:
    """One direction of a propagation in progress. ``position``: the last slice written (the start slice before
    any); ``previous`` its mask (rows, columns) bool, ``logits`` SAM's (1, 256, 256) logits of it (None: none are
    sent), ``before`` the mask of the slice before it; ``stopped``: a stop rule ended it (a limit does not)."""

    report: DirectionReport
    step: int
    position: int
    previous: np.ndarray
    logits: Optional[torch.Tensor]
    before: Optional[np.ndarray] = None
    stopped: bool = False


def bounding_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """(4,) x0, y0, x1, y1 (inclusive) of a 2D mask; None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=float)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the pixel of a non-empty 2D mask farthest from its edge (the maximum of its distance
    transform; the image border counts as edge)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return np.array([col, row], dtype=float)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays; 1 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def below(value: float, threshold: float) -> str:
    """"value < threshold" with as many decimals (2 to 6) as it takes for the printed value to read below the
    printed threshold (0.2999 against 0.3 prints "0.2999 < 0.3", never "0.30 < 0.3")."""
    for decimals in range(2, 7):
        text = f"{value:.{decimals}f}"
        if float(text) < threshold:
            return f"{text} < {threshold:g}"
    return f"{value!r} < {threshold!r}"


class Propagator:
    """Carries slice masks to their neighbours with one SAM over the slices of one image.

    Args:
        segmenter: a `clisc.sam.SliceSegmenter` (its ``predict_logits``, ``batch_size``).
        embeddings: the slices' embeddings; the next ``segmenter.batch_size`` slices of a direction, within its
            limit, are embedded in one encoder call (so at most ``batch_size - 1`` slices past a stop are embedded
            in vain).
        min_iou, min_overlap: the stop rules (module docstring).
        use_points: prompt with points besides the box (for a point-trained SAM; `Refiner.propagate` says why
            LiteMedSAM gets none).
        send_logits: send SAM's logits of the previous slice as its mask input.
    """

    def __init__(self, segmenter, embeddings: SliceEmbeddings, min_iou: float, min_overlap: float, use_points: bool,
                 send_logits: bool = True) -> None:
        self.segmenter, self.embeddings = segmenter, embeddings
        self.min_iou, self.min_overlap = min_iou, min_overlap
        self.use_points, self.send_logits = use_points, send_logits

    def start(self, direction: str, index: int, mask: np.ndarray, logits: Optional[torch.Tensor]) -> Front:
        """A front leaving slice ``index`` (mask (rows, columns) bool, non-empty) "up" (increasing index) or
        "down"; ``logits``: SAM's logits of exactly that mask, or None."""
        return Front(DirectionReport(direction), +1 if direction == "up" else -1, int(index), mask, logits)

    def advance(self, front: Front, last: int, limit_reason: str,
                write: Callable[[int, object], None], visit: Callable[[int], None] = lambda index: None) -> None:
        """Step ``front`` on until a stop rule or past ``last``, the farthest slice it may write (then
        ``front.report.reason`` is ``limit_reason``). ``write(index, prediction)`` gets each accepted slice's
        `clisc.sam.SlicePrediction`; ``visit(index)`` is called before each slice is predicted (progress, cancel).
        A stopped front does not move."""
        report, step = front.report, front.step
        while not front.stopped:
            target = front.position + step
            if (target - last) * step > 0:
                report.reason = limit_reason
                return
            visit(target)
            ahead = range(target, target + step * getattr(self.segmenter, "batch_size", 1), step)
            self.embeddings.compute([i for i in ahead if (last - i) * step >= 0])
            points = labels = None
            if self.use_points:
                points, labels = propagation_points(front.previous, front.before)
            prediction = self.segmenter.predict_logits(
                self.embeddings[target], front.previous.shape, points=points, labels=labels,
                box=bounding_box(front.previous), mask_input=front.logits if self.send_logits else None,
                multimask=False)
            overlap = dice(prediction.mask, front.previous)
            report.ious.append(round(prediction.iou, 4))
            report.overlaps.append(round(overlap, 4))
            reason = self.refusal(prediction, overlap)
            if reason:
                report.stopped_at, report.reason, front.stopped = target, reason, True
                return
            write(target, prediction)
            report.first = target if report.first is None else report.first
            report.last = front.position = target
            front.before, front.previous, front.logits = front.previous, prediction.mask, prediction.low_res_logits

    def refusal(self, prediction, overlap: float) -> str:
        """Why a prediction ends its direction, in words; "" when it is accepted."""
        if not prediction.mask.any():
            return "SAM's mask is empty"
        if prediction.iou < self.min_iou:
            return f"SAM's predicted IoU {below(prediction.iou, self.min_iou)}"
        if overlap < self.min_overlap:
            return f"Dice with the previous slice {below(overlap, self.min_overlap)}"
        return ""


def propagation_points(previous: np.ndarray, before: Optional[np.ndarray]) -> tuple:
    """Points (P, 2) (x, y) and labels (P,) for the next slice: a positive point at the centroid of ``previous``
    (at its most interior pixel when the centroid falls outside it) and a negative one inside the largest region
    where ``previous`` shrank from ``before``."""
    centroid = np.array(ndimage.center_of_mass(previous))[::-1]
    col, row = np.round(centroid).astype(int)
    point = centroid if previous[row, col] else interior_point(previous)
    points, labels = [point], [1]
    if before is not None:
        shrunk = before & ~previous
        if shrunk.any():
            components, count = ndimage.label(shrunk)
            largest = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            points.append(interior_point(largest))
            labels.append(0)
    return np.array(points), np.array(labels)
