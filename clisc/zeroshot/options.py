"""The options of a zero-shot run: presets, validation before any model is loaded, the slice axis and range, and
each prompt's target profile with the options' overrides."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..clip_scoring import NEGATIVE_PROMPTS
from ..errors import InputError
from ..profiles import OVERRIDABLE, PROFILES, Profile, choose_profile, with_overrides
from ..result import resolve_device
from ..runtime import choose_runtime
from ..volume import Volume, slice_axis  # slice_axis: part of this module's API too

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARACTERS = 300  # CLIP reads at most 77 tokens; longer text is a mistake, not a prompt
MODES = ("every-slice", "seeded")  # a saliency map on every selected slice, or on seeds only (`zeroshot.seeded`)


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
    mode: str = "every-slice"               # every-slice | seeded (`clisc.zeroshot.seeded`: where the profile allows)
    seed_spacing: int = 20                  # seeded: one seed per this many slices of a gated run (at least one)
    propagation_margin: int = 10            # seeded: slices propagation may go past each end of a gated run
    runtime: str = "auto"                   # auto | torch | openvino | onnxruntime: CPU runtime of CLIP's image
                                            # tower and LiteMedSAM's encoder (`clisc.runtime`)


PRESETS = {
    # The papers' defaults: M2IB with 10 Adam steps on 10 noise samples (β from the target profile), SAM in
    # full precision.
    "accurate": {"saliency": "m2ib", "saliency_options": {"steps": 10, "samples": 10}},
    # A laptop CPU: the same M2IB, with CLIP and the SAM encoder under bf16 autocast (LiteMedSAM's encoder 1.6-1.9x
    # faster on 2 cores; its masks differ from float32 ones by a median of 18 pixels per slice, at equal Dice),
    # and LiteMedSAM, the medical SAM that ships with CLISC (75 GFLOP per slice against vit_b's 972); M2IB on a
    # few seed slices only, SAM propagation between them (`clisc.zeroshot.seeded`; as accurate as every slice
    # on the BraTS oracle benchmark). The README's "Accuracy and speed" has the measurements.
    "fast": {"saliency": "m2ib", "saliency_options": {"steps": 10, "samples": 10}, "sam": "litemedsam",
             "clip_precision": "bfloat16", "sam_precision": "bfloat16", "mode": "seeded"},
}


def preset_options(preset: str = "accurate", **overrides) -> SegmentOptions:
    """The options of ``preset`` with each override given (not None) in place of its value."""
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
    choose_runtime(options.runtime, resolve_device(options.device))
    choose_profile("", options.profile)
    if not 0 <= options.relevance_threshold <= 1 or options.relevance_smoothing < 1:
        raise InputError(f"--relevance-threshold {options.relevance_threshold} and --relevance-smoothing "
                         f"{options.relevance_smoothing}: use a threshold in [0, 1] and at least 1 slice")
    _check_contrast(volume, axis, options.slices)
    with_overrides(PROFILES["organ"], **profile_overrides(options))
    if options.mode not in MODES or options.seed_spacing < 1 or options.propagation_margin < 0:
        raise InputError(f"--mode {options.mode}, seed spacing {options.seed_spacing} and propagation margin "
                         f"{options.propagation_margin}: use a mode of {', '.join(MODES)}, a spacing of at least 1 "
                         "slice and a margin of 0 or more")
    if "beta" in options.saliency_options:
        raise InputError("give M2IB's beta as SegmentOptions.beta (--beta), not in saliency_options")
    return axis


def _check_contrast(volume: Volume, axis: int, slices: str) -> None:
    """InputError when no slice in the ``--slices`` range has two different values: nothing to segment."""
    from .stages import candidate_slices, percentile_window_uint8

    windowed = np.moveaxis(percentile_window_uint8(volume.array), axis, 0)
    if not candidate_slices(windowed, slices).any():
        where = "" if slices in ("auto", "all") else f" in --slices {slices}"
        raise InputError(
            f"{volume.source or 'the volume'}: no slice{where} has any contrast (shape "
            f"{' × '.join(map(str, volume.array.shape[::-1]))} voxels, every slice one value), so there is nothing "
            "to segment. Check that this file is the image itself, not an empty export or a mask"
            + (", or choose --slices where the image shows anatomy." if where else "."))


def profile_overrides(options: SegmentOptions) -> dict:
    """The profile settings the options give (None where the profile's own value stands)."""
    return {key: getattr(options, key) for key in OVERRIDABLE}


def prompt_profile(options: SegmentOptions, prompt: str, two_dimensional: bool) -> tuple[Profile, dict]:
    """The method settings for one prompt (its profile with the options' overrides) and how they were chosen,
    for the report."""
    chosen, why = choose_profile(prompt, options.profile, two_dimensional)
    profile, overridden = with_overrides(chosen, **profile_overrides(options))
    return profile, {"profile": chosen.name, "why": why, "settings": profile.settings(),
                     "overridden_by_flags": overridden}
