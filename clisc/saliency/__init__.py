"""Text-conditioned saliency maps from a CLIP model with a ViT image tower (METHOD.md A.1).

All methods take ``(model, images, text_embeddings, **options)``: an open_clip CLIP model (open_clip or
timm ViT image tower), images (B, 3, H, W) normalised with the model's mean and std, and L2-normalised
text embeddings (B, E) or (1, E). They return (B, H, W) float32 maps on the CPU in [0, 1] per image, and
leave the model as they found it.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .gradcam import gradcam_saliency
from .gscorecam import gscorecam_saliency
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


__all__ = ["METHODS", "compute_saliency", "gradcam_saliency", "gscorecam_saliency", "m2ib_saliency"]
