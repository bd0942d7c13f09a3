"""`ZeroShotSegmenter`: the zero-shot pipeline's models and the order of its stages (`stages`)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .. import deviations
from ..clip_scoring import POSITIVE_TEMPLATES, ClipScorer
from ..embeddings import EmbeddingCache, SliceEmbeddings
from ..models.loaders import load_clip, load_sam
from ..precision import dtype_of
from ..profiles import Profile
from ..progress import CancelToken, ProgressCallback, no_progress
from ..protocols import SaliencyMethod, SliceSam, SliceScorer
from ..result import SegmentResult, resolve_device
from ..saliency import ClipSaliency
from ..volume import Volume
from .options import SegmentOptions, check_options, check_prompts, prompt_profile
from .stages import (
    candidate_slices,
    keep_3d,
    percentile_window_uint8,
    saliency_maps,
    sam_masks,
    select_slices,
    slice_prompts,
    smoothed_relevance,
)
from .seeded import choose_seeds, seed_predictions, seeded_mask, uses_seeds

logger = logging.getLogger(__name__)


class ZeroShotSegmenter:
    """The zero-shot pipeline with its models loaded; `segment` runs it on one volume.

    Args:
        options: the run's parameters (see `preset_options`).
        clip, sam: loaded models (`clisc.models.loaders.load_clip` / `load_sam`); loaded from ``options.clip``
            / ``options.sam`` when omitted and not built below.
        scorer: CLIP for the slice gate and the saliency grid; default a `ClipScorer` of ``clip``.
        slice_sam: SAM on slices; default a `clisc.sam.SliceSegmenter` of ``sam``.
        saliency: the saliency method; default ``options.saliency`` on the scorer's CLIP model (a `ClipScorer`).
        cache: where SAM's slice embeddings are kept; give a refinement's `clisc.refine.Refiner` the same cache
            and SAM, and its clicks reuse what segmenting computed. Default: the pipeline's own, which a run with
            several prompts grows to hold every candidate slice (4 MiB each), so that no slice is embedded twice
            when seeded prompts propagate over the same slices one after the other.
    """

    def __init__(self, options: SegmentOptions, clip=None, sam=None, *, scorer: Optional[SliceScorer] = None,
                 slice_sam: Optional[SliceSam] = None, saliency: Optional[SaliencyMethod] = None,
                 cache: Optional[EmbeddingCache] = None) -> None:
        if (clip is not None and scorer is not None) or (sam is not None and slice_sam is not None):
            raise ValueError("give a loaded model or the object built on it (clip or scorer, sam or slice_sam)")
        self.options = options
        self.device = resolve_device(options.device)
        if scorer is None:
            scorer = ClipScorer(clip or load_clip(options.clip), self.device, dtype_of(options.clip_precision, "CLIP"),
                                options.runtime)
        if slice_sam is None:
            from ..sam import SliceSegmenter  # imports torchvision: only when SAM is built here

            sam = (sam or load_sam(options.sam)).to(self.device)
            slice_sam = SliceSegmenter(sam, dtype_of(options.sam_precision, "SAM"), options.sam_batch_size,
                                       options.runtime)
        if saliency is None:
            saliency = ClipSaliency(options.saliency, scorer.model, options.saliency_options, scorer.autocast_dtype,
                                    getattr(scorer, "kept_tokens", None))
        self.scorer, self.sam, self.saliency = scorer, slice_sam, saliency
        self.cache, self.own_cache = (cache, False) if cache is not None else (EmbeddingCache(), True)

    def segment(self, volume: Volume, prompts: Sequence[str], progress: ProgressCallback = no_progress,
                cancel: Optional[CancelToken] = None) -> SegmentResult:
        """Masks and saliency maps of each prompt on ``volume``'s grid (K, J, I), and the run's report."""
        options, cancel = self.options, cancel or CancelToken()
        prompts = check_prompts(prompts)
        torch.manual_seed(options.seed)  # M2IB's noise and any other torch sampling
        axis = check_options(volume, options)
        profiles, profile_reports = zip(*(prompt_profile(options, p, min(volume.array.shape) == 1) for p in prompts))
        modes = [uses_seeds(p) if options.mode == "seeded" else (False, "every slice: --mode every-slice")
                 for p in profiles]
        seeded = [n for n, (chosen, _) in enumerate(modes) if chosen]
        view = percentile_window_uint8(volume.array)
        slices = np.moveaxis(view, axis, 0)  # (N, H, W)
        candidates = candidate_slices(slices, options.slices)
        timings: Dict[str, float] = {}

        with _timed(timings, "relevance"):
            images = self.scorer.images(slices[candidates]) if candidates.any() else None
            texts = [self.scorer.prompt_embedding(p) for p in prompts]
            gated = options.slices == "auto"
            relevance, selected = select_slices(  # the seeds need relevance without the gate too
                self.scorer, images, texts, candidates,
                options.negative_prompts if gated or seeded else None,
                options.relevance_threshold, options.relevance_smoothing)
            if not gated:
                selected = np.repeat(candidates[None], len(prompts), axis=0)
        for prompt, chosen in zip(prompts, selected):
            if candidates.any() and not chosen.any():
                logger.warning("no slice is relevant to %r; its segment is empty (try --slices all)", prompt)
        mapped = selected.copy()  # the slices that get a saliency map
        smoothed = smoothed_relevance(relevance, options.relevance_smoothing)
        for n in seeded:
            mapped[n] = False
            mapped[n, choose_seeds(selected[n], options.seed_spacing)] = True
        with _timed(timings, "saliency"):
            saliency = saliency_maps(self.saliency, self.scorer, images, candidates, mapped, texts,
                                     [p.beta for p in profiles], slices.shape[1:], prompts, progress, cancel)
        sam_prompts = slice_prompts(saliency, mapped, profiles, options.coarse_method, options.positive_points,
                                    options.negative_points, options.seed)
        if self.own_cache and len(prompts) > 1:
            self.cache.max_slices = max(self.cache.max_slices, int(candidates.sum()))
        embeddings = SliceEmbeddings(self.sam, view, axis, self.cache)
        with _timed(timings, "sam"):
            every_slice = {index: {n: p for n, p in by_prompt.items() if n not in seeded}
                           for index, by_prompt in sam_prompts.items()}
            masks = sam_masks(embeddings, {i: p for i, p in every_slice.items() if p}, len(prompts), progress, cancel)
            seeds = {n: seed_predictions(self.sam, embeddings, {i: p[n] for i, p in sam_prompts.items() if n in p},
                                         progress, cancel) for n in seeded}
        seed_reports = {}
        with _timed(timings, "propagation"):
            for n in seeded:
                masks[n], seed_reports[prompts[n]] = seeded_mask(
                    self.sam, embeddings, seeds[n], selected[n], smoothed[n], candidates, options.propagation_margin,
                    progress, cancel)
        voxel_mm3 = float(np.prod(volume.spacing))
        volume_masks = [np.moveaxis(keep_3d(m, profile, voxel_mm3), 0, axis) for m, profile in zip(masks, profiles)]

        report = {
            "input": volume.source,
            "shape_kji": list(volume.array.shape),
            "axis": int(axis),
            "prompts": prompts,
            "options": asdict(options),
            "profiles": dict(zip(prompts, profile_reports)),
            "slice_gate": self.slice_gate(),
            "deviations": self.deviations(profiles, bool(seeded)),
            "relevance": {p: relevance[n].round(4).tolist() for n, p in enumerate(prompts)},
            "selected_slices": {p: np.flatnonzero(selected[n]).tolist() for n, p in enumerate(prompts)},
            "mode": {p: why for p, (_, why) in zip(prompts, modes)},
            "saliency_slices": {p: np.flatnonzero(mapped[n]).tolist() for n, p in enumerate(prompts)},
            "seeded": seed_reports,
            "sam_prompts": {p: {str(i): sam_prompts[i][n].as_dict() for i in sam_prompts if n in sam_prompts[i]}
                            for n, p in enumerate(prompts)},
            "slices_embedded": embeddings.computed,
            "sam_box_prompts_only": self.sam.box_prompts_only,  # points given with a box were not sent to SAM
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "runtimes": self.runtimes(),
            "device": str(self.device),
        }
        return SegmentResult(volume_masks, prompts, [np.moveaxis(s, 0, axis) for s in saliency], report)

    def slice_gate(self) -> Optional[dict]:
        """What the slice-relevance gate used (None when ``--slices`` is not auto)."""
        if self.options.slices != "auto":
            return None
        return {"what": deviations.SLICE_GATE, "positive_templates": list(POSITIVE_TEMPLATES),
                "negative_prompts": list(self.options.negative_prompts),
                "threshold": self.options.relevance_threshold, "smoothing_slices": self.options.relevance_smoothing}

    def runtimes(self) -> dict:
        """What ran CLIP's image tower, SAM's image encoder and its decoder for box prompts (`clisc.runtime`),
        with an export's first-run seconds; absent for a stage that did not run there."""
        ran = {"clip_tower": getattr(self.scorer, "tower_runtime", lambda: None)(),
               "sam_encoder": getattr(self.sam, "encoder_runtime", lambda: None)(),
               "sam_decoder": getattr(self.sam, "decoder_runtime", lambda: None)()}
        return {k: v for k, v in ran.items() if v is not None}

    def deviations(self, profiles: Sequence[Profile], seeded: bool) -> List[str]:
        """The departures from the papers and reference code that applied to this run."""
        notes = [f"{name}: {text}" for name, text in deviations.ZERO_SHOT.items()]
        if self.options.slices == "auto":
            notes.append(deviations.SLICE_GATE)
        if seeded:
            notes.append(deviations.SEEDED)
        if self.options.saliency == "gscorecam":
            notes.append(deviations.GSCORECAM)
        if self.sam.box_prompts_only and any(p.prompt_type == "both" for p in profiles):
            notes.append(deviations.BOX_ONLY_SAM)
        return notes


@contextmanager
def _timed(timings: Dict[str, float], stage: str) -> Iterator[None]:
    """Adds the seconds the block takes to ``timings[stage]``."""
    started = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - started
