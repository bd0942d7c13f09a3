"""Slice-level labels from CLIP (METHOD.md §B step 2): normal / abnormal / unsure, smoothed along the volume."""
from __future__ import annotations

import numpy as np

from ..protocols import SliceScorer

NORMAL_TEMPLATE = ("an image of {organ}tissue showing typical signal intensity without any regions of abnormal "
                   "intensity or suspicious mass")
ABNORMAL_TEMPLATE = ("an image of {organ}tissue showing {article} {lesion} with uneven hyperintensity and irregular "
                     "borders distinct from surroundings")
UNSURE = -1


def default_prompts(target: str) -> tuple[str, str]:
    """(normal, abnormal) prompts from a target such as "brain tumor": the last word is the lesion, the words
    before it the organ. For "brain tumor" these are the paper's prompts, word for word."""
    words = target.strip().split()
    if not words:
        raise ValueError("the target prompt is empty")
    organ = " ".join(words[:-1]) + " " if len(words) > 1 else ""
    lesion = words[-1]
    article = "an" if lesion[0].lower() in "aeiou" else "a"
    return NORMAL_TEMPLATE.format(organ=organ), ABNORMAL_TEMPLATE.format(organ=organ, article=article, lesion=lesion)


def clip_slice_labels(scorer: SliceScorer, slices_uint8: np.ndarray, normal: str, abnormal: str,
                      threshold: float = 0.6, window: int = 5, max_gap: int = 6, min_neighbours: int = 8,
                      batch_size: int = 32) -> np.ndarray:
    """CLIP's label of each slice of one volume.

    Args:
        scorer: CLIP.
        slices_uint8: (K, H, W) uint8, the axial slices (see `cases.to_uint8_slices`).
        normal, abnormal: the two prompts of the 2-way softmax (one text each, no template ensemble).
        threshold, window, max_gap, min_neighbours: see `smooth_slice_labels`.

    Returns:
        (K,) int: 1 abnormal, 0 normal, -1 unsure (to leave out of training).
    """
    normal_text, abnormal_text = scorer.text_embedding([normal]), scorer.text_embedding([abnormal])
    probabilities = []
    for start in range(0, len(slices_uint8), batch_size):
        images = scorer.images(slices_uint8[start:start + batch_size])
        probabilities.append(scorer.relevance(scorer.image_embeddings(images), abnormal_text, normal_text))
    probability = np.concatenate(probabilities) if probabilities else np.zeros(0)
    return smooth_slice_labels(probability, threshold, window, max_gap, min_neighbours)


def smooth_slice_labels(p_abnormal: np.ndarray, threshold: float = 0.6, window: int = 5, max_gap: int = 6,
                        min_neighbours: int = 8) -> np.ndarray:
    """Confident labels, then a majority vote of neighbouring slices.

    A slice is kept when the larger of its two probabilities is >= ``threshold`` (labelled 1 if
    ``p_abnormal`` is that one, else 0) and is -1 otherwise. The neighbours of a kept slice are the other
    kept slices at most ``window`` places from it in the list of kept slices and at most ``max_gap`` slices
    from it in the volume; with more than ``min_neighbours`` of them, the slice takes their majority label
    (a tie makes it normal, 0, as the released code does). Votes use the labels before smoothing.

    Args:
        p_abnormal: (K,) probability of the abnormal prompt per slice.

    Returns:
        (K,) int in {1, 0, -1}.
    """
    p_abnormal = np.asarray(p_abnormal, dtype=float)
    labels = np.full(len(p_abnormal), UNSURE, dtype=int)
    labels[p_abnormal >= threshold] = 1
    labels[1 - p_abnormal >= threshold] = 0
    kept = np.flatnonzero(labels != UNSURE)
    smoothed = labels.copy()
    for position, z in enumerate(kept):
        around = kept[max(0, position - window):position + window + 1]
        around = around[(around != z) & (np.abs(around - z) <= max_gap)]
        if len(around) > min_neighbours:
            abnormal = int(labels[around].sum())
            smoothed[z] = int(abnormal > len(around) - abnormal)
    return smoothed
