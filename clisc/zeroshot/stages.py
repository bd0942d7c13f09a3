"""The stages of the zero-shot pipeline, in order (METHOD.md §A).

Slices are the volume's planes along the slice axis, stacked first: (N, H, W), windowed to uint8 by
`percentile_window_uint8`. P is the number of prompts; a slice index is a position along the slice axis.

1. `candidate_slices` and `select_slices`: which slices each prompt is segmented on (CLIP's relevance gate).
2. `saliency_maps`: a saliency map per prompt and selected slice.
3. `slice_prompts`: each map's coarse mask and the SAM prompt it gives.
4. `sam_masks`: SAM's mask per prompt and prompted slice, every slice embedded once for all prompts (the
   every-slice mode; the seeded mode's SAM stages are `seeded`'s).
5. `keep_3d`: the stacked masks after the prompt's 3D component rule.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import uniform_filter1d

from ..components import components_of_at_least, largest_components
from ..embeddings import SliceEmbeddings
from ..profiles import Profile, min_component_mm3
from ..progress import CancelToken, ProgressCallback
from ..prompts import SamPrompt, coarse_mask, sam_prompt
from ..protocols import SaliencyMethod, SliceScorer
from .options import slice_range

SlicePrompts = Dict[int, Dict[int, SamPrompt]]  # slice index → prompt number → what SAM gets there


def percentile_window_uint8(array: np.ndarray) -> np.ndarray:
    """``array`` as uint8 (same shape): NaN and Inf replaced, the 0.5 and 99.5 percentiles of its non-zero finite
    values mapped to 0 and 255, clipped outside (those of every finite value when the two coincide, as in a binary
    image). All zeros when no value is finite and non-zero."""
    finite = np.isfinite(array)
    values = array[finite & (array != 0)]
    if values.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = np.percentile(values, [0.5, 99.5])
    if high - low < 1e-6:  # no window among the non-zero values (a binary image): every finite value's keeps contrast
        low, high = np.percentile(array[finite], [0.5, 99.5])
    clean = np.where(finite, array, low).astype(np.float32)
    scaled = (clean - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def candidate_slices(slices: np.ndarray, spec: str) -> np.ndarray:
    """(N,) bool: the slices of ``slices`` (N, H, W) in the ``--slices`` range ``spec`` that have any contrast (a
    flat slice has nothing to segment)."""
    return slice_range(spec, len(slices)) & (np.ptp(slices.reshape(len(slices), -1), axis=1) > 0)


def select_slices(scorer: SliceScorer, images: Optional[torch.Tensor], texts: Sequence[torch.Tensor],
                  candidates: np.ndarray, negative_prompts: Optional[Sequence[str]], threshold: float = 0.5,
                  smoothing: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The slices each prompt is segmented on: CLIP's relevance gate (ours, in neither paper), or every candidate.

    With ``negative_prompts`` a slice's relevance to prompt p is the probability that CLIP matches it to p's
    embedding rather than to the negative prompts'; a candidate is selected where its relevance, averaged over
    ``smoothing`` slices along the axis (edges repeated), reaches ``threshold``. Without them every candidate
    is selected.

    Args:
        scorer: CLIP.
        images: CLIP inputs (M, 3, S, S) of the M candidates in slice order; None when M = 0.
        texts: the prompts' embeddings, P of (D,).
        candidates: (N,) bool, from `candidate_slices`.

    Returns:
        relevance (P, N) float in [0, 1], 0 on the slices not scored; selected (P, N) bool, within the candidates.
    """
    relevance = np.zeros((len(texts), len(candidates)))
    if negative_prompts is None or not candidates.any():
        return relevance, np.repeat(candidates[None], len(texts), axis=0)
    negative = scorer.text_embedding(negative_prompts)
    embeddings = scorer.image_embeddings(images)
    for n, text in enumerate(texts):
        relevance[n, candidates] = scorer.relevance(embeddings, text, negative)
    return relevance, (smoothed_relevance(relevance, smoothing) >= threshold) & candidates


def smoothed_relevance(relevance: np.ndarray, smoothing: int) -> np.ndarray:
    """Relevance (P, N) averaged over ``smoothing`` slices along the axis (edges repeated): what the gate
    thresholds and the seeded mode's peak is taken from."""
    return uniform_filter1d(relevance, size=smoothing, axis=-1, mode="nearest")


def saliency_maps(saliency: SaliencyMethod, scorer: SliceScorer, images: Optional[torch.Tensor],
                  candidates: np.ndarray, selected: np.ndarray, texts: Sequence[torch.Tensor],
                  betas: Sequence[float], shape: tuple, names: Sequence[str], progress: ProgressCallback,
                  cancel: CancelToken) -> np.ndarray:
    """The saliency of each selected slice for its prompt, one slice at a time, on the slices' pixels.

    Args:
        saliency: the method, given one CLIP input (1, 3, S, S), the prompt's embedding (1, D) and its β.
        scorer: brings the map back from CLIP's input grid to the slice's (H, W) pixels.
        images, candidates: as for `select_slices`.
        selected: (P, N) bool, within the candidates.
        texts, betas, names: per prompt, its embedding (D,), M2IB's β and its text (for ``progress``).
        shape: (H, W) of a slice.
        progress: called with ("saliency", maps done, maps to do, prompt) before each map and once at the end.
        cancel: checked before each map.

    Returns:
        (P, N, H, W) float32 in [0, 1]; 0 on the slices not selected.
    """
    maps = np.zeros(selected.shape + tuple(shape), dtype=np.float32)
    rows = np.cumsum(candidates) - 1  # slice index → its row in ``images``
    work = [(n, index) for n in range(len(selected)) for index in np.flatnonzero(selected[n])]
    for done, (n, index) in enumerate(work):
        cancel.raise_if_cancelled()
        progress("saliency", done, len(work), names[n])
        grid_map = saliency(images[rows[index]][None], texts[n][None], betas[n])
        maps[n, index] = scorer.to_slice_grid(grid_map, shape)[0]
    progress("saliency", len(work), len(work), "")
    return maps


def slice_prompts(saliency: np.ndarray, selected: np.ndarray, profiles: Sequence[Profile], coarse_method: str,
                  positive_points: int, negative_points: int, seed: int) -> SlicePrompts:
    """The SAM prompt of each selected slice, from its saliency map's coarse mask (`clisc.prompts`).

    Args:
        saliency: (P, N, H, W) in [0, 1], from `saliency_maps`.
        selected: (P, N) bool.
        profiles: per prompt, its components K, box per component and prompt type.
        coarse_method: kmeans, otsu or fixed (`clisc.prompts.coarse_mask`).
        positive_points, negative_points: points sampled inside and outside the coarse mask (points modes).
        seed: seeds the point sampling, one generator over the prompts and slices in order.

    Returns:
        {slice index: {prompt number: prompt}}, without the slices whose coarse mask is empty.
    """
    rng = np.random.default_rng(seed)
    prompts: SlicePrompts = {}
    for n, profile in enumerate(profiles):
        for index in np.flatnonzero(selected[n]):
            mask = coarse_mask(saliency[n, index], coarse_method, profile.components)
            prompt = sam_prompt(mask, profile.prompt_type, profile.box_per_component, positive_points,
                                negative_points, rng)
            if prompt is not None:
                prompts.setdefault(int(index), {})[n] = prompt
    return prompts


def sam_masks(embeddings: SliceEmbeddings, prompts: SlicePrompts, count: int, progress: ProgressCallback,
              cancel: CancelToken) -> np.ndarray:
    """SAM's masks: each prompted slice embedded once (``batch_size`` at a time), then decoded per prompt.

    Args:
        embeddings: the SAM (``embeddings.segmenter``) and the slices (N, H, W) uint8 it sees, with their cache.
        prompts: from `slice_prompts`.
        count: P, the number of prompts.
        progress: called with ("SAM", slices embedded, slices to embed, "") before each batch and at the end.
        cancel: checked before each batch.

    Returns:
        (P, N, H, W) bool, empty on the slices without a prompt.
    """
    sam, shape = embeddings.segmenter, embeddings.slices.shape
    masks = np.zeros((count,) + shape, dtype=bool)
    indices = sorted(prompts)
    step = sam.batch_size
    for start in range(0, len(indices), step):
        cancel.raise_if_cancelled()
        progress("SAM", start, len(indices), "")
        batch = indices[start:start + step]
        embeddings.compute(batch)
        for index in batch:
            for n, prompt in prompts[index].items():
                masks[n, index] = sam.predict(embeddings[index], shape[1:], prompt)
    progress("SAM", len(indices), len(indices), "")
    return masks


def keep_3d(masks: np.ndarray, profile: Profile, voxel_mm3: float) -> np.ndarray:
    """The stacked slice masks (N, H, W) bool after the profile's 3D component rule (full connectivity): its K
    largest components, all of them, or those of ``profile.keep_3d`` mm³ or more (``voxel_mm3`` a voxel's)."""
    if profile.keep_3d == "largest":
        return largest_components(masks, profile.components)
    if profile.keep_3d == "all":
        return masks
    return components_of_at_least(masks, math.ceil(min_component_mm3(profile.keep_3d) / voxel_mm3))
