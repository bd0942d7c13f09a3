"""How the saliency methods reach into the ViT image tower of an open_clip model.

Two layouts are supported, detected from the model: open_clip's own ``VisionTransformer``
(``model.visual.transformer.resblocks``, OpenAI CLIP and most open_clip models) and a timm ViT trunk
(``model.visual.trunk.blocks``, BiomedCLIP). Token tensors are batch first, (B, T, D), with the class
token first and T - 1 patch tokens on a square grid.

Also here: the image-text score the methods explain and the conversion of a patch grid to a [0, 1] map at
image size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


def vision_blocks(model: nn.Module) -> nn.Module:
    """The transformer blocks of the image tower, in order (an ``nn.ModuleList`` or ``nn.Sequential``)."""
    visual = model.visual
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        return transformer.resblocks
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        return trunk.blocks
    raise InputError(
        f"saliency needs a CLIP model with a ViT image tower; this one has a {type(visual).__name__}. "
        "Choose a ViT CLIP model (for example BiomedCLIP or ViT-B-16)."
    )


def mlp_norm(block: nn.Module) -> nn.Module:
    """The norm in front of a block's MLP (open_clip ``ln_2``, timm ``norm2``)."""
    return block.ln_2 if hasattr(block, "ln_2") else block.norm2


class _Stop(Exception):
    pass


def tokens_after_block(model: nn.Module, images: torch.Tensor, index: int) -> torch.Tensor:
    """Run the image tower up to and including block ``index``; return its output tokens (B, T, D).

    The blocks after ``index`` are not run: a hook stops the forward pass once the block has run.
    """
    captured = []

    def grab(module, inputs, output):
        captured.append(output)
        raise _Stop

    handle = vision_blocks(model)[index].register_forward_hook(grab)
    try:
        model.visual(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def features_from_tokens(model: nn.Module, tokens: torch.Tensor, first_block: int) -> torch.Tensor:
    """Finish the image tower from the input tokens (B, T, D) of block ``first_block``: image features (B, E).

    With ``tokens_after_block(model, images, k)`` as input and ``first_block = k + 1`` this equals
    ``model.visual(images)``. When the tower pools its class token, the last block computes that token alone
    (`class_token_block`): the features are the same, for about a quarter of the block's work.
    """
    visual = model.visual
    blocks = list(vision_blocks(model)[first_block:])
    last = blocks.pop() if blocks and pools_class_token(visual) and _plain_block(blocks[-1]) else None
    x = tokens
    for block in blocks:
        x = block(x)
    if last is not None:
        x = class_token_block(last, x)
    if hasattr(visual, "trunk"):
        trunk = visual.trunk
        return visual.head(trunk.forward_head(trunk.norm(x)))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def pools_class_token(visual: nn.Module) -> bool:
    """Whether the image features depend on the last block's class token alone (class-token pooling, no
    attention pooler)."""
    if hasattr(visual, "trunk"):
        trunk = visual.trunk
        return getattr(trunk, "global_pool", None) == "token" and getattr(trunk, "attn_pool", None) is None
    return getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None


def _plain_block(block: nn.Module) -> bool:
    """A pre-norm block whose attention `class_token_block` can compute for one query: open_clip's
    ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or timm's ``Block`` with its plain ``Attention``."""
    if hasattr(block, "ln_1"):
        return isinstance(block.attn, nn.MultiheadAttention) and not hasattr(block, "ln_1_kv")
    attention = getattr(block, "attn", None)
    return (type(block).__name__ == "Block" and type(attention).__name__ == "Attention"
            and all(hasattr(attention, name) for name in ("qkv", "q_norm", "k_norm", "norm", "proj")))


def class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)[:, :1]`` for tokens x (B, T, D), computing the class token alone: its query against every
    token's key and value, then the block's MLP on that one token. Returns (B, 1, D)."""
    if hasattr(block, "ln_1"):  # open_clip
        normed = block.ln_1(x)
        h = x[:, :1] + block.ls_1(block.attn(normed[:, :1], normed, normed, need_weights=False)[0])
        return h + block.ls_2(block.mlp(block.ln_2(h)))
    attention = block.attn  # timm
    batch, count, width = x.shape
    qkv = attention.qkv(block.norm1(x)).reshape(batch, count, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attention.q_norm(qkv[0][:, :, :1]), attention.k_norm(qkv[1]), qkv[2]
    attended = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)  # (B, heads, 1, head_dim)
    h = attention.proj(attention.norm(attended.transpose(1, 2).reshape(batch, 1, width)))
    h = x[:, :1] + block.ls1(h)
    return h + block.ls2(block.mlp(block.norm2(h)))


class TowerWithTokens(nn.Module):
    """``model.visual`` with, from the same forward pass, the tokens after block ``layer``.

    forward: images (B, 3, S, S) → features (B, E), and the tokens (B, T, D) when ``layer`` is not None.
    """

    def __init__(self, model: nn.Module, layer: int | None) -> None:
        super().__init__()
        self.visual, self.layer = model.visual, layer
        self.training = model.visual.training  # so that a caller restoring this module's mode restores the tower's

    def forward(self, images: torch.Tensor):
        if self.layer is None:
            return self.visual(images)
        captured = []
        block = vision_blocks(self)[self.layer]
        handle = block.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            features = self.visual(images)
        finally:
            handle.remove()
        return features, captured[0]


def cosine_to_text(features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N,) of image features (N, E) with text embeddings (N, E) or (1, E)."""
    if features.shape[-1] != text_embeddings.shape[-1]:
        raise InputError(
            f"text embeddings have {text_embeddings.shape[-1]} features but the image tower gives "
            f"{features.shape[-1]}: encode the text with the same CLIP model"
        )
    return F.cosine_similarity(features.float(), text_embeddings.float(), dim=-1)


def check_inputs(images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return the text embeddings as (B, E), one row per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"saliency expects images of shape (B, 3, H, W); got {tuple(images.shape)}")
    if text_embeddings.ndim == 1:
        text_embeddings = text_embeddings[None]
    if text_embeddings.ndim != 2 or text_embeddings.shape[0] not in (1, images.shape[0]):
        raise InputError(
            f"text embeddings must be (B, E) or (1, E) for {images.shape[0]} images; "
            f"got {tuple(text_embeddings.shape)}"
        )
    return text_embeddings.to(images.device).expand(images.shape[0], -1)


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the class token and fold the patch tokens (B, T, D) into maps (B, D, g, g), g = sqrt(T - 1)."""
    batch, num_tokens, dim = tokens.shape
    side = math.isqrt(num_tokens - 1)
    if side * side != num_tokens - 1:
        raise InputError(
            f"the image tower has {num_tokens} tokens, not one class token plus a square patch grid; "
            "saliency supports plain ViT towers only"
        )
    return tokens[:, 1:].reshape(batch, side, side, dim).permute(0, 3, 1, 2)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Rescale each map of (N, H, W) to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - low
    # Where the span is 0 the numerator is exactly 0 too, so the clamp turns 0/0 into 0.
    return (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)


def upsample(maps: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of patch-grid maps (N, g, g) to (N, *size): pixel centres aligned, or with
    ``align_corners`` the corner pixels (gScoreCAM's channel masks, as in its reference code)."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=align_corners)[:, 0]


def to_saliency(grid_maps: torch.Tensor, size) -> torch.Tensor:
    """Patch-grid maps (B, g, g) → saliency (B, *size), float32 on the CPU, min-max normalised per image."""
    return minmax(upsample(grid_maps.float(), size)).cpu()
