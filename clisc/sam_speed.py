"""SAM's image encoder with fused attention: the same embeddings, computed faster.

segment_anything's ``Attention`` writes attention as (q·scale)·kᵀ plus the decomposed relative-position
terms, a softmax, then ·v, materialising each step in memory. `accelerate_image_encoder` gives every
attention block of the encoder a forward that passes the same relative-position terms as the additive float
mask of ``torch.nn.functional.scaled_dot_product_attention``, one fused kernel on CPU and GPU. Parameters,
``state_dict`` and results are unchanged (float32: equal to rounding error).

Measured on a 2-core CPU, full-size vit_b, one 1024×1024 slice: see ``scripts/bench_sam_encoder.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .torchvision_compat import import_torchvision

import_torchvision()

from segment_anything.modeling.image_encoder import Attention, get_rel_pos  # noqa: E402


class FusedAttention(Attention):
    """`Attention` computed by ``scaled_dot_product_attention``; same parameters and same result.

    Installed on an existing block by `accelerate_image_encoder` (class swap, no new parameters).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) tokens of one window (or of the whole image in a global block); returns the same shape."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, H*W, head_dim)
        bias = self._rel_pos_bias(q, height, width) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))

    def _rel_pos_bias(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The decomposed relative-position terms of ``add_decomposed_rel_pos`` as one additive mask
        (B, heads, H*W, H*W): query (h, w) to key (h', w') gets q·R_h[h - h'] + q·R_w[w - w']."""
        batch, heads, tokens, dim = q.shape
        r_q = q.reshape(batch * heads, height, width, dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, self.rel_pos_w))
        # einsum returns permuted strides; contiguous terms make the (large) sum contiguous, so the
        # reshape below is a view and not a copy of the whole mask
        rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, tokens, tokens)


def accelerate_image_encoder(sam) -> None:
    """Give every attention block of ``sam.image_encoder`` the fused forward of `FusedAttention`.

    In place and idempotent; parameters, ``state_dict`` and pickling are unaffected. Only the image
    encoder changes (the mask decoder's attention is a different class, on a few tokens).

    Args:
        sam: a `segment_anything.modeling.Sam` (or anything with an ``image_encoder`` module).
    """
    for module in sam.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention


def image_embeddings(sam, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """SAM image embeddings of pre-processed images, without gradients.

    Args:
        sam: a `segment_anything.modeling.Sam` in eval mode (accelerated or not).
        images: (B, 3, 1024, 1024) float, normalised and padded as by ``sam.preprocess``, on any device
            (moved to the model's).
        dtype: autocast dtype for the encoder: ``torch.bfloat16`` (CPU with AVX512-BF16/AMX, or CUDA),
            ``torch.float16`` (CUDA), or None for float32.

    Returns:
        (B, 256, 64, 64) float32 embeddings on the model's device.
    """
    device = next(sam.image_encoder.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return sam.image_encoder(images.to(device)).float()
