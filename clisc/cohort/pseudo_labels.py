"""SAM pseudo-labels from CAM masks (METHOD.md §B step 5; also S3F's re-prompting, step 7).

Coordinates follow segment_anything (see `clisc.prompts`): a point is (x, y) = (column, row), a box
(x0, y0, x1, y1) with inclusive pixel bounds.
"""
from __future__ import annotations

import numpy as np
from skimage import exposure

from ..progress import CancelToken, ProgressCallback, no_progress
from ..prompts import SamPrompt
from ..sam import SliceSegmenter

BRIGHT_FRACTION = 0.6


def sam_pseudo_label(segmenter: SliceSegmenter, slices_uint8: np.ndarray, cam_masks: np.ndarray,
                     box_dilation: int = 10, progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None) -> np.ndarray:
    """SAM's mask on every slice with a non-empty CAM mask; the other slices stay empty.

    Each such slice is histogram-equalised and given to SAM as 3 channels, with the prompt of `slice_prompt`;
    SAM's single-mask output is kept whole.

    Args:
        slices_uint8: (K, H, W) uint8 slices of one volume (per-slice min-max, `cases.to_uint8_slices`).
        cam_masks: (K, H, W) bool, the prompting masks (enhanced CAM; for S3F, the U-Net's prediction).
        box_dilation: pixels added on each side of the mask's bounding box (clipped to the slice).

    Returns:
        (K, H, W) bool.
    """
    labels = np.zeros(cam_masks.shape, dtype=bool)
    todo = np.flatnonzero(cam_masks.any(axis=(1, 2)))
    done = 0
    progress("pseudo-labels", done, len(todo), "")
    while done < len(todo):
        if cancel is not None:
            cancel.raise_if_cancelled()
        chunk = todo[done:done + segmenter.batch_size]
        embeddings = segmenter.embed(np.stack([equalised_rgb(slices_uint8[k]) for k in chunk]))
        for k, embedding in zip(chunk, embeddings):
            prompt = slice_prompt(slices_uint8[k], cam_masks[k], box_dilation)
            labels[k] = segmenter.predict(embedding, slices_uint8[k].shape, prompt)
        done += len(chunk)
        progress("pseudo-labels", done, len(todo), "")
    return labels


def equalised_rgb(slice_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the histogram-equalised slice (H, W) uint8 in three channels (a flat slice as is)."""
    image = slice_uint8
    if np.ptp(slice_uint8) > 0:
        image = (exposure.equalize_hist(slice_uint8, nbins=256) * 255).round().astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1)


def slice_prompt(slice_uint8: np.ndarray, mask: np.ndarray, box_dilation: int = 10) -> SamPrompt:
    """The paper's prompt from a non-empty mask (H, W) on a slice (H, W) uint8.

    - box: the mask's bounding box grown by ``box_dilation`` pixels on each side, clipped to the slice;
    - 5 positive points: among the mask's pixels with intensity >= min + 0.6 (max − min) (min and max over
      the mask), taken in row-major order, the candidates at indices 0, n//3, n//2, 2n//3 and n−1
      (repeats when n < 5);
    - 4 negative points: the corners of the box.
    """
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    x0, y0 = max(cols.min() - box_dilation, 0), max(rows.min() - box_dilation, 0)
    x1, y1 = min(cols.max() + box_dilation, width - 1), min(rows.max() + box_dilation, height - 1)
    inside = slice_uint8[mask].astype(float)
    cut = inside.min() + BRIGHT_FRACTION * (inside.max() - inside.min())
    candidates = np.argwhere(mask & (slice_uint8 >= cut))  # (n, 2) row, col in row-major order
    n = len(candidates)
    positives = candidates[[0, n // 3, n // 2, 2 * n // 3, n - 1]][:, ::-1]
    negatives = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
    return SamPrompt(boxes=np.array([[x0, y0, x1, y1]], dtype=float),
                     points=np.concatenate([positives, negatives]).astype(float),
                     labels=np.r_[np.ones(5, int), np.zeros(4, int)],
                     components=mask.size)  # as many as there can be: SAM's mask is kept whole
