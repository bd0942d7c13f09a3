"""M2IB (Wang et al., NeurIPS 2023): multi-modal information bottleneck saliency for a CLIP ViT image tower.

A bottleneck after block ``layer`` replaces its output tokens z (T, D) by z' = λ·z + (1 − λ)·ε,
ε ~ N(0, 1), λ = sigmoid(α), α (T, D) learnt from 5. Adam (lr 1) minimises
β·mean KL(N(λz, (1 − λ)²) ‖ N(0, 1)) − mean cos(text, image features of z'), the image replicated over
``samples`` noise draws. The saliency of a patch is its KL summed over features. As in the authors' code
(YingWANGG/M2IB, also used by MedCLIP-SAMv2) z is not standardised before the KL.

Speed: the blocks up to ``layer`` do not depend on α, so their output is computed once per image without
gradients and reused (or taken from the relevance pass, `KeptTokens`); each step runs only the blocks after the
bottleneck, the last of them for the class token alone (`features_from_tokens`), and computes no weight
gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..precision import autocast, prepared
from ..progress import CancelToken, ProgressCallback, no_progress
from .kept_tokens import KeptTokens
from .vision_tower import (
    check_inputs,
    cosine_to_text,
    features_from_tokens,
    patch_grid,
    to_saliency,
    tokens_after_block,
    vision_blocks,
)

INITIAL_ALPHA = 5.0
LAYER = 9  # MedCLIP-SAMv2's bottleneck: after block 9 of 12


def m2ib_saliency(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    layer: int = LAYER,
    beta: float = 1.0,
    steps: int = 10,
    samples: int = 10,
    lr: float = 1.0,
    generator: Optional[torch.Generator] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: ProgressCallback = no_progress,
    cancel: Optional[CancelToken] = None,
    kept_tokens: Optional[KeptTokens] = None,
) -> torch.Tensor:
    """M2IB saliency of each image for its text.

    Args:
        model: open_clip ``CLIP`` or ``CustomTextCLIP`` with a ViT image tower; left unchanged.
        images: (B, 3, H, W), normalised with the model's mean and std.
        text_embeddings: (B, E) one per image, or (1, E) shared; L2-normalised text features.
        layer: index (from 0) of the block after which the bottleneck sits; 9 of 12 in MedCLIP-SAMv2.
        beta: weight of the compression (KL) term; MedCLIP-SAMv2 uses 1.0 (breast US), 2.0 (brain MRI).
        steps: optimisation steps as the authors' code counts them. Their saliency is read from the
            bottleneck of the last of ``steps`` forward passes, i.e. after ``steps - 1`` Adam updates (the
            last update never reaches the saliency), so ``steps - 1`` updates are run here.
        samples: noise draws per step (the image replicated ``samples`` times).
        lr: Adam learning rate.
        generator: source of the noise, on the images' device; seed it for reproducible maps.
        autocast_dtype: run the model under ``torch.autocast`` to this dtype; the bottleneck stays float32.
        progress: called with ("saliency", images done, B, "M2IB") after each image.
        cancel: checked before each image.
        kept_tokens: the tokens after block ``layer`` that the relevance pass kept; an image found there does
            not run the blocks up to the bottleneck again.

    Returns:
        (B, H, W) float32 on the CPU, each map min-max normalised to [0, 1] (all zeros if constant).
    """
    num_blocks = len(vision_blocks(model))
    if not 0 <= layer < num_blocks:
        raise InputError(
            f"M2IB layer {layer} does not exist: this image tower has {num_blocks} blocks, numbered 0 to "
            f"{num_blocks - 1}. Pass one of them as the layer (the default 9 is for 12-block ViT-B towers)."
        )
    if steps < 1 or samples < 1:
        raise InputError(f"M2IB needs steps >= 1 and samples >= 1; got {steps} and {samples}")
    text = check_inputs(images, text_embeddings)
    maps = []
    with prepared(model):
        for i, image in enumerate(images):
            if cancel is not None:
                cancel.raise_if_cancelled()
            tokens = kept_tokens.get(image, layer, autocast_dtype) if kept_tokens is not None else None
            if tokens is None:
                with torch.no_grad(), autocast(images.device, autocast_dtype):
                    tokens = tokens_after_block(model, image[None], layer)[0].float()
            tokens = tokens.to(images.device)
            alpha = _fit_bottleneck(
                model, tokens, text[i:i + 1], layer, beta, steps - 1, samples, lr, generator, autocast_dtype
            )
            information = _kl_to_standard_normal(alpha, tokens).sum(dim=-1)
            maps.append(patch_grid(information[None, :, None])[0, 0])
            progress("saliency", i + 1, len(images), "M2IB")
    return to_saliency(torch.stack(maps), images.shape[-2:])


def _fit_bottleneck(model, tokens, text, layer, beta, updates, samples, lr, generator, autocast_dtype):
    """Learn α (T, D) for the cached block output ``tokens`` (T, D); returns it detached."""
    alpha = torch.full_like(tokens, INITIAL_ALPHA, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    text = text.expand(samples, -1)
    with torch.enable_grad():
        for _ in range(updates):
            noise = torch.randn((samples, *tokens.shape), generator=generator, device=tokens.device)
            noisy = torch.sigmoid(alpha) * tokens + torch.sigmoid(-alpha) * noise
            with autocast(tokens.device, autocast_dtype):
                features = features_from_tokens(model, noisy, layer + 1)
            compression = _kl_to_standard_normal(alpha, tokens).mean()
            loss = beta * compression - cosine_to_text(features, text).mean()
            (alpha.grad,) = torch.autograd.grad(loss, alpha)
            optimizer.step()
    return alpha.detach()


def _kl_to_standard_normal(alpha: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """KL(N(λz, (1 − λ)²) ‖ N(0, 1)) per element, λ = sigmoid(α); 1 − λ = sigmoid(−α) stays exact for large α."""
    mean = torch.sigmoid(alpha) * tokens
    return -0.5 * (1 + 2 * F.logsigmoid(-alpha) - mean**2 - torch.sigmoid(-alpha) ** 2)
