"""SAM pseudo-labels from CAM masks (METHOD.md §B step 5; also S3F's re-prompting, step 7).

Coordinates follow segment_anything (see `clisc.prompts`): a point is (x, y) = (column, row), a box
(x0, y0, x1, y1) with inclusive pixel bounds.
"""
from __future__ import annotations

import numpy as np

from ..progress import CancelToken, ProgressCallback, no_progress
from ..prompts import SamPrompt
from ..protocols import SliceSam
from .cases import minmax_slices

BRIGHT_FRACTION = 0.6


def sam_pseudo_label(segmenter: SliceSam, slices: np.ndarray, cam_masks: np.ndarray,
                     box_dilation: int = 10, progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None) -> np.ndarray:
    """SAM's mask on every slice with a non-empty CAM mask; the other slices stay empty.

    Each such slice, min-max scaled to [0, 255], truncated to uint8 and histogram-equalised (`sam_image`), goes
    to SAM with the prompt of `slice_prompt`; SAM's single-mask output is kept whole.

    Args:
        slices: (K, H, W) the slices of one volume (the pre-processed image, `cases.preprocess`), any dtype;
            each is min-max scaled on its own.
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
        intensity = minmax_slices(slices[chunk], np.float64)  # float64: the point cut is sharp
        embeddings = segmenter.embed(np.stack([sam_image(plane) for plane in intensity]))
        for k, plane, embedding in zip(chunk, intensity, embeddings):
            labels[k] = segmenter.predict(embedding, plane.shape, slice_prompt(plane, cam_masks[k], box_dilation))
        done += len(chunk)
        progress("pseudo-labels", done, len(todo), "")
    return labels


def sam_image(intensity: np.ndarray) -> np.ndarray:
    """What SAM sees of a slice (H, W) min-max scaled to [0, 1]: (H, W, 3) uint8, the slice times 255 truncated
    to uint8 (the reference's ``.astype(np.uint8)``, not rounded), then `equalised_rgb`."""
    return equalised_rgb((intensity * 255).astype(np.uint8))


def equalised_rgb(slice_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the slice (H, W) uint8 histogram-equalised as OpenCV's ``equalizeHist`` does, in three
    channels. The lowest grey level present maps to 0: lut = round((cdf − cdf_min) / (N − cdf_min) · 255),
    with cdf_min the count of that level and N the pixel count. A flat slice stays as it is."""
    cdf = np.cumsum(np.bincount(slice_uint8.ravel(), minlength=256))
    lowest = cdf[slice_uint8.min()]
    image = slice_uint8
    if lowest < slice_uint8.size:
        lut = np.round((cdf - lowest) / (slice_uint8.size - lowest) * 255).clip(0, 255).astype(np.uint8)
        image = lut[slice_uint8]
    return np.repeat(image[..., None], 3, axis=-1)


def slice_prompt(intensity: np.ndarray, mask: np.ndarray, box_dilation: int = 10) -> SamPrompt:
    """The paper's prompt from a non-empty mask (H, W) on a slice's intensity (H, W) min-max scaled to [0, 1]
    in floating point (`minmax_slices`, before any uint8 rounding).

    - box: the mask's bounding box grown by ``box_dilation`` pixels on each side, clipped to the slice;
    - 5 positive points: among the mask's pixels with intensity >= 0.6 × the maximum intensity inside the
      mask, taken in row-major order, the candidates at indices 0, n//3, n//2, 2n//3 and n−1 (repeats when
      n < 5);
    - 4 negative points: the corners of the box.
    """
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    x0, y0 = max(cols.min() - box_dilation, 0), max(rows.min() - box_dilation, 0)
    x1, y1 = min(cols.max() + box_dilation, width - 1), min(rows.max() + box_dilation, height - 1)
    candidates = np.argwhere(mask & (intensity >= BRIGHT_FRACTION * intensity[mask].max()))  # (n, 2) row, col
    n = len(candidates)
    positives = candidates[[0, n // 3, n // 2, 2 * n // 3, n - 1]][:, ::-1]
    negatives = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])
    return SamPrompt(boxes=np.array([[x0, y0, x1, y1]], dtype=float),
                     points=np.concatenate([positives, negatives]).astype(float),
                     labels=np.r_[np.ones(5, int), np.zeros(4, int)],
                     components=mask.size)  # as many as there can be: SAM's mask is kept whole
