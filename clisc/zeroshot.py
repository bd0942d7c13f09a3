"""Zero-shot text-prompted segmentation of a volume or 2D image (METHOD.md §A, MedCLIP-SAM).

Per prompt: CLIP decides which slices show the target (positive prompt ensemble against a negative one,
smoothed along the slice axis: our gate, in neither paper), a saliency map (M2IB, gScoreCAM or GradCAM) on
those slices gives a coarse mask, the mask gives box/point prompts, SAM draws the slice masks, and the
stacked masks keep the 3D components the prompt's target profile (`clisc.profiles`) says. SAM image
embeddings are computed once per slice for all prompts.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import uniform_filter1d

from .clip_scoring import NEGATIVE_PROMPTS, POSITIVE_TEMPLATES, ClipScorer
from . import deviations
from .errors import InputError
from .profiles import OVERRIDABLE, PROFILES, Profile, choose_profile, min_component_mm3, with_overrides
from .precision import dtype_of
from .progress import CancelToken, ProgressCallback, no_progress
from .prompts import SamPrompt, coarse_mask, components_of_at_least, largest_components, sam_prompt
from .result import SegmentResult, resolve_device
from .saliency import compute_saliency
from .volume import Volume

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARACTERS = 300  # CLIP reads at most 77 tokens; longer text is a mistake, not a prompt
AXIS_NAMES = {"k": 0, "j": 1, "i": 2}
ANATOMICAL_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis each plane is normal to


@dataclass
class SegmentOptions:
    """Every parameter of a zero-shot run (recorded in the report). Presets fill in the defaults."""

    clip: str = "biomedclip"
    sam: str = "sam_vit_b"
    saliency: str = "m2ib"
    saliency_options: Dict[str, float] = field(default_factory=dict)  # β is `beta`, not here
    profile: str = "auto"                   # a `clisc.profiles.PROFILES` name, or auto: from each prompt's words
    beta: Optional[float] = None            # these five, when given, replace the profile's settings
    components: Optional[int] = None
    box_per_component: Optional[bool] = None
    prompt_type: Optional[str] = None
    keep_3d: Optional[str] = None           # largest | all | a size in mm³
    axis: str = "auto"                      # auto | axial | coronal | sagittal | k | j | i
    slices: str = "auto"                    # auto (CLIP relevance) | all | FIRST:LAST (inclusive, 0-based)
    negative_prompts: Sequence[str] = NEGATIVE_PROMPTS
    relevance_threshold: float = 0.5
    relevance_smoothing: int = 5            # slices in the moving average of relevance along the axis
    coarse_method: str = "kmeans"
    positive_points: int = 10               # MedCLIP-SAMv2's defaults for the points mode
    negative_points: int = 0
    device: str = "auto"                    # auto | cpu | cuda
    clip_precision: str = "float32"         # float32 | bfloat16 | float16 (under autocast)
    sam_precision: str = "float32"
    sam_batch_size: int = 2
    seed: int = 0


PRESETS = {
    # The papers' defaults: M2IB with 10 Adam steps on 10 noise samples (β from the target profile), SAM in
    # full precision.
    "accurate": {"saliency": "m2ib", "saliency_options": {"steps": 10, "samples": 10}},
    # A laptop CPU: the same M2IB, with CLIP and the SAM encoder under bf16 autocast (LiteMedSAM's encoder 1.6-1.9x
    # faster on 2 cores; its masks differ from float32 ones by a median of 18 pixels per slice, at equal Dice),
    # and LiteMedSAM, the medical SAM that ships with CLISC (75 GFLOP per slice against vit_b's 972). The
    # README's "Accuracy and speed" has the measurements.
    "fast": {"saliency": "m2ib", "saliency_options": {"steps": 10, "samples": 10}, "sam": "litemedsam",
             "clip_precision": "bfloat16", "sam_precision": "bfloat16"},
}


def preset_options(preset: str = "accurate", **overrides) -> SegmentOptions:
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; use {' or '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = dict(PRESETS[preset])
    if overrides.get("saliency", base["saliency"]) != base["saliency"]:
        base.pop("saliency_options", None)  # the preset's settings are for its own method
    return replace(SegmentOptions(**base), **overrides)


def check_prompts(prompts: Sequence[str]) -> List[str]:
    """Stripped prompts, each once (a repeat is dropped with a warning: it would make a second segment of the
    same name); InputError for none, an empty one, or one too long to be a prompt."""
    cleaned = []
    for prompt in (" ".join(str(p).split()) for p in prompts):
        if prompt.lower() in (seen.lower() for seen in cleaned):
            logger.warning("the prompt %r is given more than once; it is segmented once", prompt)
        else:
            cleaned.append(prompt)
    if not cleaned:
        raise InputError("give at least one text prompt, e.g. --prompt \"brain tumor\"")
    for prompt in cleaned:
        if not prompt:
            raise InputError("a prompt is empty or only white space; say what to segment, e.g. \"brain tumor\"")
        if len(prompt) > MAX_PROMPT_CHARACTERS:
            raise InputError(f"a prompt has {len(prompt)} characters; CLIP reads about 77 words at most, so keep "
                             f"each prompt under {MAX_PROMPT_CHARACTERS} characters (e.g. \"{prompt[:30]}...\")")
    return cleaned


def slice_axis(volume: Volume, axis: str) -> int:
    """Array axis (0=k, 1=j, 2=i) to slice along: an index letter, an anatomical plane, or auto."""
    if axis == "auto":
        return volume.acquisition_axis()
    if axis in AXIS_NAMES:
        return AXIS_NAMES[axis]
    if axis in ANATOMICAL_AXES:
        # the index axis (i, j, k) whose direction is closest to the plane's normal, as an array axis
        directions = np.abs(volume.ijk_to_ras[:3, :3] / volume.spacing)
        return 2 - int(np.argmax(directions[ANATOMICAL_AXES[axis]]))
    raise InputError(f"unknown axis {axis!r}; use auto, axial, coronal, sagittal, k, j or i")


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Window a volume to uint8: NaN/Inf replaced, 0.5-99.5 percentiles of the non-zero voxels to 0-255."""
    finite = np.isfinite(array)
    values = array[finite & (array != 0)]
    if values.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = np.percentile(values, [0.5, 99.5])
    clean = np.where(finite, array, low).astype(np.float32)
    scaled = (clean - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def slice_range(spec: str, count: int) -> np.ndarray:
    """Boolean (count,) of the slices a ``--slices`` value names (auto and all name every slice)."""
    if spec in ("auto", "all"):
        return np.ones(count, dtype=bool)
    try:
        first, last = (int(part) for part in spec.split(":"))
    except ValueError:
        raise InputError(f"--slices {spec!r}: use auto, all or FIRST:LAST (0-based, inclusive)") from None
    if not 0 <= first <= last < count:
        raise InputError(f"--slices {spec!r}: the axis has slices 0 to {count - 1}")
    chosen = np.zeros(count, dtype=bool)
    chosen[first:last + 1] = True
    return chosen


def check_options(volume: Volume, options: SegmentOptions) -> int:
    """Validate the options, with what depends on the volume, before any model is loaded; returns the slice
    axis."""
    axis = slice_axis(volume, options.axis)
    slice_range(options.slices, volume.array.shape[axis])
    resolve_device(options.device)
    choose_profile("", options.profile)
    if not 0 <= options.relevance_threshold <= 1 or options.relevance_smoothing < 1:
        raise InputError(f"relevance threshold {options.relevance_threshold} and smoothing "
                         f"{options.relevance_smoothing}: use a threshold in [0, 1] and at least 1 slice")
    with_overrides(PROFILES["organ"], **profile_overrides(options))
    if "beta" in options.saliency_options:
        raise InputError("give M2IB's beta as SegmentOptions.beta (--beta), not in saliency_options")
    return axis


def profile_overrides(options: SegmentOptions) -> dict:
    return {key: getattr(options, key) for key in OVERRIDABLE}


def prompt_profile(options: SegmentOptions, prompt: str, two_dimensional: bool) -> tuple[Profile, dict]:
    """The method settings for one prompt (its profile with the options' overrides) and how they were chosen,
    for the report."""
    chosen, why = choose_profile(prompt, options.profile, two_dimensional)
    profile, overridden = with_overrides(chosen, **profile_overrides(options))
    return profile, {"profile": chosen.name, "why": why, "settings": profile.settings(),
                     "overridden_by_flags": overridden}


def keep_3d(masks: np.ndarray, profile: Profile, voxel_mm3: float) -> np.ndarray:
    """The stacked slice masks (N, H, W) bool after the profile's 3D component rule."""
    if profile.keep_3d == "largest":
        return largest_components(masks, profile.components)
    if profile.keep_3d == "all":
        return masks
    return components_of_at_least(masks, math.ceil(min_component_mm3(profile.keep_3d) / voxel_mm3))


class ZeroShotSegmenter:
    """Holds the loaded CLIP and SAM models; `segment` runs the pipeline on one volume.

    Args:
        options: the run's parameters (see `preset_options`).
        clip, sam: already loaded models (`clisc.models.loaders.load_clip` / `load_sam`); loaded from
            ``options.clip`` / ``options.sam`` when omitted.
    """

    def __init__(self, options: SegmentOptions, clip=None, sam=None) -> None:
        from .models.loaders import load_clip, load_sam
        from .sam import SliceSegmenter

        self.options = options
        self.device = resolve_device(options.device)
        self.clip = ClipScorer(clip or load_clip(options.clip), self.device, dtype_of(options.clip_precision, "CLIP"))
        sam = (sam or load_sam(options.sam)).to(self.device)
        self.sam = SliceSegmenter(sam, dtype_of(options.sam_precision, "SAM"), options.sam_batch_size)

    def slice_saliency(self, index: int, image: torch.Tensor, text: torch.Tensor, shape: tuple,
                       beta: float) -> np.ndarray:
        """Saliency (H, W) in [0, 1] of slice ``index`` given its CLIP input (1, 3, S, S), a text (D,) and
        M2IB's β (unused by the other methods)."""
        options = dict(self.options.saliency_options, **({"beta": beta} if self.options.saliency == "m2ib" else {}))
        maps = compute_saliency(self.options.saliency, self.clip.model, image, text[None],
                                autocast_dtype=self.clip.autocast_dtype, **options)
        return self.clip.to_slice_grid(maps, shape)[0]

    def segment(self, volume: Volume, prompts: Sequence[str], progress: ProgressCallback = no_progress,
                cancel: Optional[CancelToken] = None) -> SegmentResult:
        options, cancel = self.options, cancel or CancelToken()
        prompts = check_prompts(prompts)
        torch.manual_seed(options.seed)  # M2IB's noise and any other torch sampling
        timings: Dict[str, float] = {}
        axis = check_options(volume, options)
        profiles, profile_reports = zip(*(prompt_profile(options, p, min(volume.array.shape) == 1) for p in prompts))
        slices = np.moveaxis(to_uint8(volume.array), axis, 0)          # (N, H, W)
        count, shape = len(slices), slices.shape[1:]
        candidates = slice_range(options.slices, count) & (np.ptp(slices.reshape(count, -1), axis=1) > 0)
        if not candidates.any():
            logger.warning("%s: no slice has any contrast; the segments are empty", volume.source or "volume")

        started = time.perf_counter()
        indices = np.flatnonzero(candidates)
        images = self.clip.images(slices[indices]) if len(indices) else None
        texts = [self.clip.prompt_embedding(p) for p in prompts]
        relevance = np.zeros((len(prompts), count))
        if options.slices == "auto" and len(indices):
            negative = self.clip.text_embedding(options.negative_prompts)
            embeddings = self.clip.image_embeddings(images)
            for n, text in enumerate(texts):
                relevance[n, indices] = self.clip.relevance(embeddings, text, negative)
            smoothed = uniform_filter1d(relevance, size=options.relevance_smoothing, axis=1, mode="nearest")
            selected = (smoothed >= options.relevance_threshold) & candidates
        else:
            selected = np.repeat(candidates[None], len(prompts), axis=0)
        timings["relevance"] = time.perf_counter() - started
        for prompt, chosen in zip(prompts, selected):
            if candidates.any() and not chosen.any():
                logger.warning("no slice is relevant to %r; its segment is empty (try --slices all)", prompt)

        started = time.perf_counter()
        saliency = np.zeros((len(prompts), count) + shape, dtype=np.float32)
        position = {index: row for row, index in enumerate(indices)}
        work = [(n, index) for n in range(len(prompts)) for index in np.flatnonzero(selected[n])]
        for done, (n, index) in enumerate(work):
            cancel.raise_if_cancelled()
            progress("saliency", done, len(work), prompts[n])
            saliency[n, index] = self.slice_saliency(int(index), images[position[index]][None], texts[n], shape,
                                                     profiles[n].beta)
        progress("saliency", len(work), len(work), "")
        timings["saliency"] = time.perf_counter() - started

        rng = np.random.default_rng(options.seed)
        sam_prompts: Dict[int, Dict[int, SamPrompt]] = {}
        for n, index in work:
            mask = coarse_mask(saliency[n, index], options.coarse_method, profiles[n].components)
            prompt = sam_prompt(mask, profiles[n].prompt_type, profiles[n].box_per_component, options.positive_points,
                                options.negative_points, rng)
            if prompt is not None:
                sam_prompts.setdefault(int(index), {})[n] = prompt

        started = time.perf_counter()
        masks = np.zeros((len(prompts), count) + shape, dtype=bool)
        to_embed = sorted(sam_prompts)
        step = self.sam.batch_size
        for start in range(0, len(to_embed), step):
            cancel.raise_if_cancelled()
            progress("SAM", start, len(to_embed), "")
            batch = to_embed[start:start + step]
            embeddings = self.sam.embed(np.repeat(slices[batch][..., None], 3, axis=-1))
            for embedding, index in zip(embeddings, batch):
                for n, prompt in sam_prompts[index].items():
                    masks[n, index] = self.sam.predict(embedding, shape, prompt)
        progress("SAM", len(to_embed), len(to_embed), "")
        timings["sam"] = time.perf_counter() - started

        voxel_mm3 = float(np.prod(volume.spacing))
        volume_masks = [np.moveaxis(keep_3d(m, profile, voxel_mm3), 0, axis) for m, profile in zip(masks, profiles)]
        report = {
            "input": volume.source,
            "shape_kji": list(volume.array.shape),
            "axis": int(axis),
            "prompts": prompts,
            "options": asdict(self.options),
            "profiles": dict(zip(prompts, profile_reports)),
            "slice_gate": self.slice_gate(),
            "deviations": self.deviations(profiles),
            "relevance": {p: relevance[n].round(4).tolist() for n, p in enumerate(prompts)},
            "selected_slices": {p: np.flatnonzero(selected[n]).tolist() for n, p in enumerate(prompts)},
            "sam_prompts": {prompts[n]: {str(i): sam_prompts[i][n].as_dict() for i in sam_prompts if n in sam_prompts[i]}
                            for n in range(len(prompts))},
            "slices_embedded": len(to_embed),
            "sam_box_prompts_only": self.sam.box_prompts_only,  # points given with a box were not sent to SAM
            "seconds": {k: round(v, 3) for k, v in timings.items()},
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

    def deviations(self, profiles: Sequence[Profile]) -> List[str]:
        """The departures from the papers and reference code that applied to this run."""
        notes = [f"{name}: {text}" for name, text in deviations.ZERO_SHOT.items()]
        if self.options.slices == "auto":
            notes.append(deviations.SLICE_GATE)
        if self.options.saliency == "gscorecam":
            notes.append(deviations.GSCORECAM)
        if self.sam.box_prompts_only and any(p.prompt_type == "both" for p in profiles):
            notes.append(deviations.BOX_ONLY_SAM)
        return notes
