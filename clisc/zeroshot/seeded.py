"""The seeded mode of the zero-shot pipeline (ours, in neither paper): a saliency map on a few seed slices only, SAM
on the seeds, and SAM propagation (`clisc.propagation`, the refine engine's) from the seeds through the target.

Per prompt whose profile keeps one target (`uses_seeds`):
1. `gate_runs`: the runs of consecutive slices the gate selected (without the gate: every candidate).
2. `choose_seeds`: in each run, ceil(length / ``spacing``) seeds: the first at the run's peak of smoothed relevance
   (the gate's own moving average), the others spread over the two sides of the peak so that no slice of the run
   is far from a seed (`spread`).
3. The saliency map, its coarse mask and SAM prompt (the stages of the every-slice mode) on the seeds only, and
   SAM's mask and logits there (`seed_predictions`).
4. `propagate_seeds`: from each seed up and down, slice by slice, until a stop rule of `clisc.propagation` or the
   bound: each run grown by ``margin`` slices at both ends (the end slices a gate misses are where propagation
   helps), within the candidates. Where the propagations of two seeds meet, each slice takes the mask of the
   nearest seed whose propagation reaches it: neighbouring seeds propagate towards each other up to their
   midpoint, and where one of them stops short of it, the other carries on to where it stopped. No slice is
   predicted twice.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from ..components import largest_components
from ..embeddings import SliceEmbeddings
from ..profiles import Profile
from ..progress import CancelToken, ProgressCallback
from ..propagation import MIN_IOU, MIN_OVERLAP, Propagator
from ..prompts import SamPrompt

Run = Tuple[int, int]  # first and last slice index, inclusive


def uses_seeds(profile: Profile) -> Tuple[bool, str]:
    """Whether a prompt of ``profile`` is segmented in the seeded mode, and why (for the report)."""
    if profile.keep_3d != "largest":
        return False, ("every slice: the profile keeps several 3D components (multifocal), and a component on no "
                       "seed slice would be missed")
    if profile.components != 1 or profile.box_per_component:
        return False, (f"every slice: the profile keeps {profile.components} components per slice"
                       + (", a box each" if profile.box_per_component else "")
                       + "; one propagated box would span them")
    return True, "seeded: the profile keeps one target"


def gate_runs(selected: np.ndarray) -> List[Run]:
    """The runs of consecutive True slices of ``selected`` (N,) bool, as (first, last) inclusive, in order."""
    edges = np.flatnonzero(np.diff(np.r_[0, selected.astype(np.int8), 0]))
    return [(int(first), int(end) - 1) for first, end in zip(edges[::2], edges[1::2])]


def spread(first: int, last: int, peak: int, count: int) -> List[int]:
    """``count`` seeds on the run ``first``..``last``: ``peak`` and count - 1 more, split between the two sides
    of the peak and placed evenly on each, so that the farthest slice of the run from its nearest seed is as
    near as can be (a side of L slices with m seeds is covered to L / (2m + 1) slices)."""
    below, above = peak - first, last - peak
    best = min(range(count), key=lambda m: max(below / (2 * m + 1), above / (2 * (count - 1 - m) + 1)))
    seeds = [peak]
    for side, length, m in ((-1, below, best), (+1, above, count - 1 - best)):
        reach = length / (2 * m + 1)
        seeds += [peak + side * int(round(2 * reach * k)) for k in range(1, m + 1)]
    return sorted(set(seeds))


def choose_seeds(smoothed: np.ndarray, selected: np.ndarray, spacing: int) -> List[int]:
    """Seed slices of one prompt: in each run of ``selected`` (N,) bool, ceil(length / ``spacing``) seeds from
    `spread`, the first at the run's highest ``smoothed`` (N,) relevance (on a tie, the one nearest the run's
    middle)."""
    seeds = []
    for first, last in gate_runs(selected):
        run = smoothed[first:last + 1]
        peaks = first + np.flatnonzero(run == run.max())
        peak = int(peaks[np.argmin(np.abs(peaks - (first + last) / 2))])
        seeds += spread(first, last, peak, math.ceil((last - first + 1) / spacing))
    return seeds


def propagation_bounds(runs: List[Run], margin: int, candidates: np.ndarray) -> List[Run]:
    """Each run grown by ``margin`` slices at both ends without leaving the candidates (N,) bool around it;
    runs that then overlap or touch are merged."""
    bounds: List[Run] = []
    for first, last in runs:
        low, high = first, last
        while low > 0 and first - low < margin and candidates[low - 1]:
            low -= 1
        while high < len(candidates) - 1 and high - last < margin and candidates[high + 1]:
            high += 1
        if bounds and low <= bounds[-1][1] + 1:
            bounds[-1] = (bounds[-1][0], high)
        else:
            bounds.append((low, high))
    return bounds


def seed_predictions(sam, embeddings: SliceEmbeddings, prompts: Dict[int, SamPrompt], progress: ProgressCallback,
                     cancel: CancelToken) -> Dict[int, object]:
    """SAM's prediction (`clisc.sam.SlicePrediction`, mask cut to the prompt's ``components`` largest blobs) on
    each seed slice from its prompt (one box, as `uses_seeds` allows; a box-trained SAM gets no points with it).
    The seeds are embedded together, ``sam.batch_size`` per encoder call; ``progress("SAM", seeds done, seeds,
    "")`` before and after, ``cancel`` checked before."""
    cancel.raise_if_cancelled()
    progress("SAM", 0, len(prompts), "")
    embeddings.compute(sorted(prompts))
    predictions = {}
    for index, prompt in sorted(prompts.items()):
        box = None if prompt.boxes is None else prompt.boxes[0]
        points = None if box is not None and sam.box_prompts_only else prompt.points
        prediction = sam.predict_logits(embeddings[index], embeddings.slices.shape[1:], points=points,
                                        labels=None if points is None else prompt.labels, box=box)
        prediction.mask = largest_components(prediction.mask, prompt.components)
        predictions[index] = prediction
    progress("SAM", len(prompts), len(prompts), "")
    return predictions


def propagate_seeds(propagator: Propagator, starts: Dict[int, Tuple[np.ndarray, torch.Tensor]], bounds: List[Run],
                    write: Callable[[int, int, object], None], visit: Callable[[int], None]) -> List[dict]:
    """Propagate every seed of ``starts`` ({slice: (mask (H, W) bool, SAM's logits of it)}) within its bound, by the
    module's reconciliation rule. ``write(slice, seed, prediction)`` gets each accepted slice and the seed it came
    from; ``visit(slice)`` is called before each prediction. Returns one record per direction of each seed: its
    `DirectionReport` fields and the seed."""
    records = []

    def go(seed: int, direction: str) -> object:
        front = propagator.start(direction, seed, *starts[seed])
        records.append((seed, front))
        return front

    def advance(front, seed: int, last: int, reason: str) -> None:
        propagator.advance(front, last, reason, lambda index, prediction: write(index, seed, prediction), visit)

    for low, high in bounds:
        seeds = sorted(seed for seed in starts if low <= seed <= high)
        if not seeds:
            continue
        advance(go(seeds[0], "down"), seeds[0], low, f"reached the bound (the gate's run - margin) at slice {low}")
        for a, b in zip(seeds, seeds[1:]):
            middle = (a + b) // 2
            up, down = go(a, "up"), go(b, "down")
            advance(up, a, middle, f"reached slice {middle}, the midpoint with seed {b}")
            advance(down, b, middle + 1, f"reached slice {middle + 1}, the midpoint with seed {a}")
            if up.stopped and not down.stopped:
                advance(down, b, up.position + 1, f"met seed {a}'s propagation, which stopped at slice "
                                                  f"{up.report.stopped_at}")
            elif down.stopped and not up.stopped:
                advance(up, a, down.position - 1, f"met seed {b}'s propagation, which stopped at slice "
                                                  f"{down.report.stopped_at}")
        advance(go(seeds[-1], "up"), seeds[-1], high, f"reached the bound (the gate's run + margin) at slice {high}")
    return [dict(seed=seed, **{key: value for key, value in vars(front.report).items()}) for seed, front in records]


def seeded_mask(sam, embeddings: SliceEmbeddings, predictions: Dict[int, object], selected: np.ndarray,
                candidates: np.ndarray, margin: int, progress: ProgressCallback, cancel: CancelToken) -> tuple:
    """One prompt's slice masks (N, H, W) bool from its seeds' predictions (`seed_predictions`), propagated within
    the runs of ``selected`` (N,) bool grown by ``margin`` (`propagation_bounds`), with the stop rules'
    defaults; and its report: the seeds, the bounds, which slices came from which seed, and where and why each
    direction stopped.

    ``progress("SAM propagation", slices visited, slices in the bounds but the seeds, "slice N")`` before each
    slice and at the end; ``cancel`` checked before each slice.
    """
    masks = np.zeros(embeddings.slices.shape, dtype=bool)
    starts = {}
    for index, prediction in predictions.items():
        masks[index] = prediction.mask
        if prediction.mask.any():
            starts[index] = (prediction.mask, prediction.low_res_logits)
    bounds = propagation_bounds(gate_runs(selected), margin, candidates)
    total = sum(high - low + 1 for low, high in bounds) - sum(any(l <= s <= h for l, h in bounds) for s in starts)
    visited, sources = 0, {}

    def visit(index: int) -> None:
        nonlocal visited
        cancel.raise_if_cancelled()
        progress("SAM propagation", visited, total, f"slice {index}")
        visited += 1

    def write(index: int, seed: int, prediction) -> None:
        masks[index] = prediction.mask
        sources.setdefault(seed, []).append(index)

    propagator = Propagator(sam, embeddings, MIN_IOU, MIN_OVERLAP, use_points=not sam.box_prompts_only)
    directions = propagate_seeds(propagator, starts, bounds, write, visit)
    progress("SAM propagation", total, total, "")
    report = {"seeds": sorted(predictions), "seeds_with_empty_mask": sorted(set(predictions) - set(starts)),
              "seed_ious": {str(index): round(p.iou, 4) for index, p in sorted(predictions.items())},
              "bounds": [list(bound) for bound in bounds], "margin": margin,
              "propagated_from": {str(seed): sorted(indices) for seed, indices in sorted(sources.items())},
              "directions": directions, "slices_visited": visited}
    return masks, report
