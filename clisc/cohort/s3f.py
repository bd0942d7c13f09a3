"""S3F, SAM-Seg similarity filtering (METHOD.md §B step 7): which U-Net predictions to self-train on.

For each training volume the U-Net's prediction, reduced to its largest connected component S, prompts SAM
(the pseudo-label recipe with no box dilation) to give Ŝ. Where SAM, prompted from S, agrees with S (high
Dice(Ŝ, S)), S is more likely a sound object; the most self-consistent fraction of the cohort is kept.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..metrics import dice
from ..progress import CancelToken, ProgressCallback, no_progress
from ..prompts import largest_components
from ..sam import SliceSegmenter
from ..writers import write_bytes
from .pseudo_labels import sam_pseudo_label

TABLE_COLUMNS = ("rank", "case_id", "similarity", "kept")


@dataclass
class S3FRow:
    """One line of the similarity table; ``rank`` 1 is the most self-consistent case."""

    rank: int
    case_id: str
    similarity: float
    kept: bool


def self_consistency(prediction: np.ndarray, slices_uint8: np.ndarray, segmenter: SliceSegmenter,
                     progress: ProgressCallback = no_progress,
                     cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, float]:
    """``(S, Dice(Ŝ, S))`` for one volume.

    Args:
        prediction: (K, H, W) bool, the U-Net's prediction on the pre-processed volume.
        slices_uint8: (K, H, W) uint8, the same volume's slices as SAM sees them (`cases.to_uint8_slices`).

    Returns:
        S (K, H, W) bool, the largest 3D connected component of ``prediction``, and the similarity in [0, 1]
        (0 for an empty prediction: there is nothing to train on).
    """
    largest = largest_components(prediction, 1)
    if not largest.any():
        return largest, 0.0
    resegmented = sam_pseudo_label(segmenter, slices_uint8, largest, box_dilation=0, progress=progress,
                                   cancel=cancel)
    return largest, dice(resegmented, largest)


def rank_cases(similarities: dict[str, float], keep: float) -> list[S3FRow]:
    """The cases by decreasing similarity (ties by case id); the first ``keep`` fraction, rounded half up
    and at least one case, is kept."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep fraction {keep}: use a number in (0, 1]")
    order = sorted(similarities, key=lambda case_id: (-similarities[case_id], case_id))
    count = max(1, math.floor(keep * len(order) + 0.5))
    return [S3FRow(rank, case_id, float(similarities[case_id]), rank <= count)
            for rank, case_id in enumerate(order, start=1)]


def write_table(rows: list[S3FRow], path: Path) -> None:
    """The similarity table as CSV (rank, case_id, similarity, kept), written atomically."""
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow(TABLE_COLUMNS)
    writer.writerows((row.rank, row.case_id, f"{row.similarity:.6f}", int(row.kept)) for row in rows)
    write_bytes(path, lines.getvalue().encode())


def read_table(path: Path) -> list[S3FRow]:
    with open(path, newline="") as file:
        return [S3FRow(int(row["rank"]), row["case_id"], float(row["similarity"]), row["kept"] == "1")
                for row in csv.DictReader(file)]
