"""gScoreCAM (Chen et al. 2022) for the ViT image tower of a CLIP model.

Activations: the last block's MLP-norm output, as for :mod:`~clisc.saliency.gradcam` (see there for the
channel gradient). The ``top_k`` channels with the largest mean gradient are kept; each one's map,
upsampled (bilinear, corners aligned as in the authors' code) and min-max normalised, masks the input
image, and the masked image is scored against the text. The softmax of those scores (as CLIP logits,
``logit_scale.exp() * cosine``, as in the authors' code) weights the channels: CAM = ReLU(sum of weight *
activation map). The authors' code puts the softmax over all channels with score 0 for the channels not
kept; here it runs over the kept channels only (a documented deviation: with small logits the unkept
channels' exp(0) terms dominate the reference's weights).

Cost: one forward and backward pass, then ``top_k`` forward passes of masked images (300 by default), run
``batch_size`` at a time across all the images' channels. That is about six times M2IB's work on a ViT-B/16
(scripts/bench_saliency.py): gScoreCAM is not the quick alternative to M2IB; GradCAM is.
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
        batch_size: masked images per forward pass, taken from all the images' kept channels in turn.
        autocast_dtype: run the model under ``torch.autocast`` to this dtype; None for full precision.
        progress: called with ("saliency", masked passes done, B · top_k, "gScoreCAM") after each batch.
        cancel: checked before each batch.

    Returns:
        (B, H, W) float32 on the CPU, each map min-max normalised to [0, 1] (all zeros if constant).
    """
    if top_k < 1 or batch_size < 1:
        raise InputError(f"gScoreCAM needs top_k >= 1 and batch_size >= 1; got {top_k} and {batch_size}")
    text = check_inputs(images, text_embeddings)
    with prepared(model):
        activations, gradients = last_block_activations(model, images, text, autocast_dtype)
        channel_maps = patch_grid(activations)  # (B, D, g, g)
        kept = gradients.mean(dim=1).topk(min(top_k, channel_maps.shape[1]), dim=1).indices  # (B, K)
        maps = channel_maps[torch.arange(len(images), device=kept.device)[:, None], kept]  # (B, K, g, g)
        owner = torch.arange(len(images), device=images.device).repeat_interleave(kept.shape[1])  # image of each pass
        flat_maps, scores = maps.flatten(0, 1), []
        for start in range(0, len(flat_maps), batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            batch = slice(start, start + batch_size)
            scores.append(_masked_scores(model, images[owner[batch]], text[owner[batch]], flat_maps[batch],
                                         autocast_dtype))
            progress("saliency", min(start + batch_size, len(flat_maps)), len(flat_maps), "gScoreCAM")
        logit_scale = model.logit_scale.detach().exp().float()
        weights = torch.softmax(logit_scale * torch.cat(scores).view(kept.shape), dim=1)  # over each image's K
        cams = torch.relu(torch.einsum("bk,bkhw->bhw", weights, maps))
    return to_saliency(cams, images.shape[-2:])


def _masked_scores(model, images, text, maps, autocast_dtype) -> torch.Tensor:
    """Cosine (N,) with its text (N, E) of each image (N, 3, H, W) masked by its map (N, g, g), normalised and
    upsampled with the corners aligned."""
    masks = minmax(upsample(maps, images.shape[-2:], align_corners=True))
    with torch.no_grad(), autocast(images.device, autocast_dtype):
        features = model.visual(images * masks[:, None].to(images.dtype))
    return cosine_to_text(features, text)
