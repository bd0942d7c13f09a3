"""Zero-shot text-prompted segmentation of a volume or 2D image (METHOD.md §A, MedCLIP-SAM).

Per prompt: CLIP decides which slices show the target (positive prompt ensemble against a negative one,
smoothed along the slice axis: our gate, in neither paper), a saliency map (M2IB, gScoreCAM or GradCAM) on
those slices gives a coarse mask, the mask gives box/point prompts, SAM draws the slice masks, and the
stacked masks keep the 3D components the prompt's target profile (`clisc.profiles`) says. SAM image
embeddings are computed once per slice for all prompts.

``options`` holds the run's parameters and their checks, ``stages`` the five stages, ``segmenter`` the
pipeline that runs them in order with its models.
"""
from .options import (
    PRESETS,
    SegmentOptions,
    check_options,
    check_prompts,
    preset_options,
    prompt_profile,
    slice_axis,
    slice_range,
)
from .segmenter import ZeroShotSegmenter
from .stages import keep_3d, percentile_window_uint8

__all__ = ["PRESETS", "SegmentOptions", "ZeroShotSegmenter", "check_options", "check_prompts", "keep_3d",
           "percentile_window_uint8", "preset_options", "prompt_profile", "slice_axis", "slice_range"]
