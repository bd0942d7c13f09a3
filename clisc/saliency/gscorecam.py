"""gScoreCAM (Chen et al. 2022) for the ViT image tower of a CLIP model.

Activations: the last block's MLP-norm output, as for :mod:`~clisc.saliency.gradcam` (see there for the
channel gradient). The ``top_k`` channels with the largest mean gradient are kept; each one's map,
upsampled (bilinear, corners aligned as in the authors' code) and min-max normalised, masks the input
image, and the masked image is scored against the text. The softmax of those scores (as CLIP logits, ``logit_scale.exp() * cosine``, as in the authors' code)
weights the channels: CAM = ReLU(sum of weight * activation map). The authors' code puts the softmax over
all channels with score 0 for the channels not kept; here it runs over the kept channels only (a documented
deviation: with small logits the unkept channels' exp(0) terms dominate the reference's weights).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from ..precision import autocast, prepared
from ..progress import CancelToken, ProgressCallback, no_progress
from .gradcam import last_block_activations
from .vision_tower import (
    check_inputs,
    cosine_to_text,
    minmax,
    patch_grid,
    to_saliency,
    upsample,
)


def gscorecam_saliency(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    top_k: int = 300,
    batch_size: int = 32,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: ProgressCallback = no_progress,
    cancel: Optional[CancelToken] = None,
) -> torch.Tensor:
    """gScoreCAM saliency of each image for its text.

    Args:
        model: open_clip ``CLIP`` or ``CustomTextCLIP`` with a ViT image tower; left unchanged.
        images: (B, 3, H, W), normalised with the model's mean and std.
        text_embeddings: (B, E) one per image, or (1, E) shared; L2-normalised text features.
        top_k: channels kept for re-scoring (at most the tower width); each costs one forward pass.
        batch_size: masked images per forward pass.
        autocast_dtype: run the model under ``torch.autocast`` to this dtype; None for full precision.
        progress: called with ("saliency", images done, B, "gScoreCAM") after each image.
        cancel: checked before each image.

    Returns:
        (B, H, W) float32 on the CPU, each map min-max normalised to [0, 1] (all zeros if constant).
    """
    if top_k < 1 or batch_size < 1:
        raise InputError(f"gScoreCAM needs top_k >= 1 and batch_size >= 1; got {top_k} and {batch_size}")
    text = check_inputs(images, text_embeddings)
    cams = []
    with prepared(model):
        activations, gradients = last_block_activations(model, images, text, autocast_dtype)
        channel_maps = patch_grid(activations)
        kept = gradients.mean(dim=1).topk(min(top_k, channel_maps.shape[1]), dim=1).indices
        logit_scale = model.logit_scale.detach().exp().float()
        for i, image in enumerate(images):
            if cancel is not None:
                cancel.raise_if_cancelled()
            maps = channel_maps[i, kept[i]]
            scores = torch.cat([
                _masked_scores(model, image, text[i:i + 1], maps[start:start + batch_size], autocast_dtype)
                for start in range(0, len(maps), batch_size)
            ])
            weights = torch.softmax(logit_scale * scores, dim=0)
            cams.append(torch.relu(torch.einsum("k,khw->hw", weights, maps)))
            progress("saliency", i + 1, len(images), "gScoreCAM")
    return to_saliency(torch.stack(cams), images.shape[-2:])


def _masked_scores(model, image, text, maps, autocast_dtype) -> torch.Tensor:
    """Cosine with the text (N,) of the image (3, H, W) masked by each normalised, upsampled map (N, g, g)."""
    masks = minmax(upsample(maps, image.shape[-2:], align_corners=True))
    with torch.no_grad(), autocast(image.device, autocast_dtype):
        features = model.visual(image[None] * masks[:, None].to(image.dtype))
    return cosine_to_text(features, text)
