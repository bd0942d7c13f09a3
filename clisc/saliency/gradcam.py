"""GradCAM for the ViT image tower of a CLIP model, explaining the image-text cosine similarity.

The layer is the output of the last block's MLP norm (open_clip ``ln_2``, timm ``norm2``), as MedCLIP-SAM
uses for BiomedCLIP. One forward and one backward pass; the cheapest and weakest of the three methods.

Channel weights are the gradient averaged over *all* tokens, class token included. At this layer each
token only feeds its own MLP, so when the tower pools the class token (CLIP, BiomedCLIP) the patch tokens'
gradients are exactly zero and a patch-only average would weight every channel 0. Averaging over all
tokens then weights each channel by the class token's gradient, which is what the gScoreCAM authors' code
does for transformers; for towers that average the patch tokens it is the usual GradCAM weight.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..precision import autocast, prepared
from .vision_tower import (
    check_inputs,
    cosine_to_text,
    mlp_norm,
    patch_grid,
    to_saliency,
    vision_blocks,
)


def last_block_activations(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Activations of the last block's MLP norm and their gradients, both (B, T, D) float32.

    The gradient is that of each image's cosine similarity with its text embedding (B, E), taken with
    respect to the activations only. Call inside :func:`~clisc.saliency.vision_tower.prepared`.
    """
    captured = []

    def make_leaf(module, inputs, output):
        leaf = output.detach().requires_grad_()
        captured.append(leaf)
        return leaf

    handle = mlp_norm(vision_blocks(model)[-1]).register_forward_hook(make_leaf)
    try:
        with torch.enable_grad(), autocast(images.device, autocast_dtype):
            scores = cosine_to_text(model.visual(images), text_embeddings)
        (gradients,) = torch.autograd.grad(scores.sum(), captured[0])
    finally:
        handle.remove()
    return captured[0].detach().float(), gradients.float()


def gradcam_saliency(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """GradCAM saliency of each image for its text.

    Args:
        model: open_clip ``CLIP`` or ``CustomTextCLIP`` with a ViT image tower; left unchanged.
        images: (B, 3, H, W), normalised with the model's mean and std (H = W = 224 for ViT-B/16).
        text_embeddings: (B, E) one per image, or (1, E) shared; L2-normalised text features.
        autocast_dtype: run the model under ``torch.autocast`` to this dtype (e.g. ``torch.bfloat16``);
            None runs in the model's own precision.

    Returns:
        (B, H, W) float32 on the CPU, each map min-max normalised to [0, 1] (all zeros if constant).
    """
    text = check_inputs(images, text_embeddings)
    with prepared(model):
        activations, gradients = last_block_activations(model, images, text, autocast_dtype)
    weights = gradients.mean(dim=1)
    cam = torch.relu(torch.einsum("bd,bdhw->bhw", weights, patch_grid(activations)))
    return to_saliency(cam, images.shape[-2:])
