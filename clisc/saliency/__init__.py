"""Text-conditioned saliency maps from a CLIP model with a ViT image tower (METHOD.md A.1).

All methods take ``(model, images, text_embeddings, **options)``: an open_clip CLIP model (open_clip or
timm ViT image tower), images (B, 3, H, W) normalised with the model's mean and std, and L2-normalised
text embeddings (B, E) or (1, E). They return (B, H, W) float32 maps on the CPU in [0, 1] per image, and
leave the model as they found it.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import InputError
from .gradcam import gradcam_saliency
from .gscorecam import gscorecam_saliency
from .kept_tokens import KeptTokens
from .m2ib import LAYER as M2IB_LAYER
from .m2ib import m2ib_saliency

METHODS = {
    "m2ib": m2ib_saliency,
    "gscorecam": gscorecam_saliency,
    "gradcam": gradcam_saliency,
}


def compute_saliency(
    method: str, model: torch.nn.Module, images: torch.Tensor, text_embeddings: torch.Tensor, **options
) -> torch.Tensor:
    """Run the saliency method named ``method`` (one of :data:`METHODS`, best first) with its ``options``."""
    try:
        function = METHODS[method.lower()]
    except KeyError:
        raise InputError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}") from None
    return function(model, images, text_embeddings, **options)


class ClipSaliency:
    """One of :data:`METHODS` bound to a CLIP model and its settings (a `clisc.protocols.SaliencyMethod`).

    Args:
        method: the method's name.
        model: the open_clip model, on the device the images will be on.
        options: the method's keyword settings (e.g. M2IB's ``steps``), β excepted: it comes with each call.
        autocast_dtype: dtype for the forward passes under autocast, or None for full precision.
        kept_tokens: M2IB's pre-bottleneck tokens kept by the relevance pass (`ClipScorer.kept_tokens`); M2IB
            asks for its layer there and takes an image's tokens from it when present.
    """

    def __init__(self, method: str, model: torch.nn.Module, options: Optional[Mapping[str, float]] = None,
                 autocast_dtype: Optional[torch.dtype] = None, kept_tokens: Optional[KeptTokens] = None) -> None:
        self.method = method
        self.model = model
        self.options = dict(options or {})
        self.autocast_dtype = autocast_dtype
        self.kept_tokens = kept_tokens if method == "m2ib" else None
        if self.kept_tokens is not None:
            self.kept_tokens.layer = int(self.options.get("layer", M2IB_LAYER))

    def __call__(self, images: torch.Tensor, text_embeddings: torch.Tensor, beta: float) -> torch.Tensor:
        """Maps (B, S, S) float32 in [0, 1] on the CPU of images (B, 3, S, S) for text embeddings (1, E) or
        (B, E); ``beta`` reaches M2IB only."""
        options = dict(self.options, beta=beta, kept_tokens=self.kept_tokens) if self.method == "m2ib" else self.options
        return compute_saliency(self.method, self.model, images, text_embeddings,
                                autocast_dtype=self.autocast_dtype, **options)


__all__ = ["METHODS", "ClipSaliency", "KeptTokens", "compute_saliency", "gradcam_saliency", "gscorecam_saliency",
           "m2ib_saliency"]
