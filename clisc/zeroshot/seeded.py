"""The seeded mode of the zero-shot pipeline (ours, in neither paper): a saliency map on a few seed slices only, SAM
on the seeds, and SAM propagation (`clisc.propagation`, the refine engine's) from the seeds through the target.

Per prompt whose profile keeps one target (`uses_seeds`):
1. `gate_runs`: the runs of consecutive slices the gate selected (without the gate: every candidate).
2. `choose_seeds`: each run cut into ceil(length / ``spacing``) equal parts, a seed at the middle of each.
3. The saliency map, its coarse mask and SAM prompt (the stages of the every-slice mode) on the seeds only, and
   SAM's mask and logits there (`seed_predictions`).
4. `propagate_seeds`, within bounds: each run grown by ``margin`` slices at both ends (the end slices a gate misses
   are where propagation helps), within the candidates. In each bound, propagation starts from the seed of highest
   smoothed relevance (the gate's own moving average) and goes up and down, slice by slice, until a stop rule of
   `clisc.propagation` or the bound. Where it reaches another seed, the two masks on that slice are compared
   (`agreement`): where they agree, the seed takes over (its mask is fresher than one carried over many slices)
   and propagates back to the midpoint and on; where they do not, the seed's map pointed elsewhere and the
   propagation carries on through. Where a propagation stops short of the next seed, that seed starts afresh:
   back to where the other stopped, and on. A slice is embedded once; only the slices between a seed that takes
   over and the midpoint are predicted twice (SAM's prompt encoder and mask decoder only).
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
# A seed takes over from the propagation that reaches it when at least this much of the smaller of their two masks
# on its slice lies inside the other: the same object, the seed's mask fresher (`agreement`).
AGREEMENT = 0.5


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


def choose_seeds(selected: np.ndarray, spacing: int) -> List[int]:
    """Seed slices of one prompt: each run of ``selected`` (N,) bool cut into ceil(length / ``spacing``) equal parts,
    a seed at the middle of each (rounded down), so that no slice of a run is more than about ``spacing`` / 2 from a
    seed; a run shorter than ``spacing`` gets one, at its middle."""
    seeds = []
    for first, last in gate_runs(selected):
        count = math.ceil((last - first + 1) / spacing)
        part = (last - first + 1) / count
        seeds += [first + int((k + 0.5) * part) for k in range(count)]
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


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / min(|a|, |b|) of two non-empty masks: 1 when one lies inside the other, 0 when they are apart."""
    return int((a & b).sum()) / min(int(a.sum()), int(b.sum()))


def anchor_of(seeds: List[int], smoothed: np.ndarray, low: int, high: int) -> int:
    """The seed of highest ``smoothed`` relevance (on a tie, the one nearest the middle of ``low``..``high``)."""
    best = max(smoothed[seed] for seed in seeds)
    return min((seed for seed in seeds if smoothed[seed] == best), key=lambda seed: abs(seed - (low + high) / 2))


def propagate_seeds(propagator: Propagator, starts: Dict[int, Tuple[np.ndarray, torch.Tensor]], bounds: List[Run],
                    smoothed: np.ndarray, write: Callable[[int, int, np.ndarray], None],
                    visit: Callable[[int], None]) -> Tuple[List[dict], Dict[str, dict]]:
    """Propagate the seeds of ``starts`` ({slice: (mask (H, W) bool, non-empty, SAM's logits of it)}) through their
    bounds by the module's rule. ``write(slice, seed, mask)`` gets each slice's mask and the seed it came from (a
    seed that takes over writes its own slice); ``visit(slice)`` is called before each prediction. Returns one
    record per front (its `DirectionReport` fields and its seed) and, per seed a front reached, the check made
    there."""
    records: List[tuple] = []
    checks: Dict[str, dict] = {}

    def go(seed: int, direction: str):
        front = propagator.start(direction, seed, *starts[seed])
        records.append((seed, front))
        return front

    def advance(front, seed: int, last: int, reason: str) -> None:
        propagator.advance(front, last, reason, lambda index, prediction: write(index, seed, prediction.mask), visit)

    def chain(anchor: int, direction: str, ahead: List[int], end: int) -> None:
        step, back = (1, "down") if direction == "up" else (-1, "up")
        front, source = go(anchor, direction), anchor
        for seed in ahead:
            advance(front, source, seed, f"reached seed {seed}")
            if front.position == seed:  # the propagation reached the seed: the seed takes over if they agree
                score = agreement(front.previous, starts[seed][0])
                took_over = score >= AGREEMENT
                checks[str(seed)] = {"reached_from": source, "agreement": round(score, 4), "took_over": took_over}
                if not took_over:
                    front.report.reason = f"kept its mask on seed {seed}'s slice (agreement {score:.2f} < {AGREEMENT})"
                    continue
                front.report.reason = f"handed over to seed {seed} (agreement {score:.2f})"
                middle = (source + seed) // 2 if step > 0 else (source + seed + 1) // 2
                back_to, why = middle + step, f"reached slice {middle + step}, the midpoint with seed {source}"
            else:  # it stopped short: the seed starts afresh, back to where it stopped, and on
                checks[str(seed)] = {"reached_from": None, "agreement": None, "took_over": True}
                back_to, why = front.position + step, (f"met seed {source}'s propagation, which stopped at slice "
                                                       f"{front.report.stopped_at}")
            write(seed, seed, starts[seed][0])
            advance(go(seed, back), seed, back_to, why)
            front, source = go(seed, direction), seed
        advance(front, source, end, f"reached the bound (the gate's run {'+' if step > 0 else '-'} margin) at slice "
                                    f"{end}")

    for low, high in bounds:
        seeds = sorted(seed for seed in starts if low <= seed <= high)
        if not seeds:
            continue
        anchor = anchor_of(seeds, smoothed, low, high)
        chain(anchor, "down", [seed for seed in reversed(seeds) if seed < anchor], low)
        chain(anchor, "up", [seed for seed in seeds if seed > anchor], high)
    return [dict(seed=seed, **vars(front.report)) for seed, front in records], checks


def seeded_mask(sam, embeddings: SliceEmbeddings, predictions: Dict[int, object], selected: np.ndarray,
                smoothed: np.ndarray, candidates: np.ndarray, margin: int, progress: ProgressCallback,
                cancel: CancelToken) -> tuple:
    """One prompt's slice masks (N, H, W) bool from its seeds' predictions (`seed_predictions`), propagated within
    the runs of ``selected`` (N,) bool grown by ``margin`` (`propagation_bounds`) by the module's rule, from the
    seed of highest ``smoothed`` (N,) relevance in each bound, with the stop rules' defaults; and its report: the
    seeds, the bounds, which slices came from which seed, each seed's check, and where and why each front ended.

    ``progress("SAM propagation", slices visited, slices in the bounds but the first seeds, "slice N")`` before each
    slice and at the end; ``cancel`` checked before each slice.
    """
    masks = np.zeros(embeddings.slices.shape, dtype=bool)
    starts = {}
    for index, prediction in predictions.items():
        masks[index] = prediction.mask
        if prediction.mask.any():
            starts[index] = (prediction.mask, prediction.low_res_logits)
    bounds = propagation_bounds(gate_runs(selected), margin, candidates)
    total = sum(high - low + 1 for low, high in bounds) - sum(any(low <= s <= high for s in starts)
                                                             for low, high in bounds)
    visited, sources = 0, {}

    def visit(index: int) -> None:
        nonlocal visited
        cancel.raise_if_cancelled()
        progress("SAM propagation", min(visited, total), total, f"slice {index}")
        visited += 1

    def write(index: int, seed: int, mask: np.ndarray) -> None:
        masks[index] = mask
        sources[index] = seed

    propagator = Propagator(sam, embeddings, MIN_IOU, MIN_OVERLAP, use_points=not sam.box_prompts_only)
    fronts, checks = propagate_seeds(propagator, starts, bounds, smoothed, write, visit)
    progress("SAM propagation", total, total, "")
    propagated_from: Dict[str, List[int]] = {}
    for index, seed in sorted(sources.items()):
        if index != seed:
            propagated_from.setdefault(str(seed), []).append(index)
    report = {"seeds": sorted(predictions), "seeds_with_empty_mask": sorted(set(predictions) - set(starts)),
              "seed_ious": {str(index): round(p.iou, 4) for index, p in sorted(predictions.items())},
              "bounds": [list(bound) for bound in bounds], "margin": margin,
              "propagated_from": dict(sorted(propagated_from.items(), key=lambda item: int(item[0]))),
              "seed_checks": checks, "directions": fronts, "slices_visited": visited}
    return masks, report
