"""S3F, SAM-Seg similarity filtering (METHOD.md §B step 7): which U-Net predictions to self-train on.

For each training volume the U-Net's prediction, reduced to its largest connected component S, prompts SAM
(the pseudo-label recipe with no box dilation) to give Ŝ, kept inside the body. Where SAM, prompted from S,
agrees with S (high Dice(Ŝ, S)), S is more likely a sound object; the most self-consistent fraction of the
cohort is kept. Volumes with an empty prediction are dropped before ranking.
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
from ..components import largest_components
from ..protocols import SliceSam
from ..writers import write_bytes
from .pseudo_labels import sam_pseudo_label

TABLE_COLUMNS = ("rank", "case_id", "similarity", "kept")


@dataclass
class S3FRow:
    """One line of the similarity table; ``rank`` 1 is the most self-consistent case. A case whose prediction
    is empty is dropped, not ranked: its rank and similarity are None."""

    rank: Optional[int]
    case_id: str
    similarity: Optional[float]
    kept: bool


def self_consistency(prediction: np.ndarray, slices: np.ndarray, segmenter: SliceSam,
                     body: Optional[np.ndarray] = None, progress: ProgressCallback = no_progress,
                     cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, Optional[float]]:
    """``(S, Dice(Ŝ, S))`` for one volume.

    Args:
        prediction: (K, H, W) bool, the U-Net's prediction on the pre-processed volume.
        slices: (K, H, W) the same volume's slices (the pre-processed image) for `sam_pseudo_label`.
        body: (K, H, W) bool, the body voxels: Ŝ is restricted to them (a listed deviation: the released code's
            ``img != 0``, on an image it has z-scored, restricts nothing)

    Returns:
        S (K, H, W) bool, the largest 3D connected component of ``prediction``, and the similarity in [0, 1];
        None for an empty prediction (there is nothing to rank or train on).
    """
    largest = largest_components(prediction, 1)
    if not largest.any():
        return largest, None
    resegmented = sam_pseudo_label(segmenter, slices, largest, box_dilation=0, progress=progress,
                                   cancel=cancel)
    if body is not None:
        resegmented &= body
    return largest, dice(resegmented, largest)


def rank_cases(similarities: dict[str, Optional[float]], keep: float) -> list[S3FRow]:
    """The cases by decreasing similarity (ties by case id), the first floor(N · ``keep``) of the N ranked
    cases kept (at least one: our addition, so that a small cohort still trains). Cases with similarity
    None (empty predictions) are dropped: listed last, unranked, not kept."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep fraction {keep}: use a number in (0, 1]")
    ranked = sorted((case for case in similarities if similarities[case] is not None),
                    key=lambda case_id: (-similarities[case_id], case_id))
    count = max(1, math.floor(keep * len(ranked)))
    rows = [S3FRow(rank, case_id, float(similarities[case_id]), rank <= count)
            for rank, case_id in enumerate(ranked, start=1)]
    return rows + [S3FRow(None, case_id, None, False) for case_id in sorted(similarities)
                   if similarities[case_id] is None]


def write_table(rows: list[S3FRow], path: Path) -> None:
    """The similarity table as CSV (rank, case_id, similarity, kept; rank and similarity empty for a dropped
    case), written atomically."""
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(("" if row.rank is None else row.rank, row.case_id,
                      "" if row.similarity is None else f"{row.similarity:.6f}", int(row.kept)) for row in rows)
    write_bytes(path, lines.getvalue().encode())


def read_table(path: Path) -> list[S3FRow]:
    with open(path, newline="", encoding="utf-8") as file:
        return [S3FRow(int(row["rank"]) if row["rank"] else None, row["case_id"],
                       float(row["similarity"]) if row["similarity"] else None, row["kept"] == "1")
                for row in csv.DictReader(file)]
