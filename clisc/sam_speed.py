"""SAM's image encoder with fused attention: the same embeddings, computed faster.

segment_anything's ``Attention`` writes attention as (q·scale)·kᵀ plus the decomposed relative-position
terms, a softmax, then ·v, materialising each step in memory: in a global block, (heads, 4096, 4096) logits
per slice. `accelerate_image_encoder` gives every attention block of the encoder a forward that never holds
them all: on CPU (without gradients) `blocked_softmax_attention` computes a few MiB of logits at a time,
relative-position terms, matrix product, softmax and product with v in cache; elsewhere the terms are the
additive float mask of ``torch.nn.functional.scaled_dot_product_attention``, one fused kernel. It also makes
the patch embedding's tokens contiguous (`ContiguousPatchEmbed`). Parameters, ``state_dict`` and results
are unchanged (float32: equal to rounding error).

Measured on a 2-core CPU, full-size vit_b, one 1024×1024 slice: see ``scripts/bench_sam_encoder.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .torchvision_compat import import_torchvision

import_torchvision()

from segment_anything.modeling.image_encoder import Attention, PatchEmbed, get_rel_pos  # noqa: E402


class FusedAttention(Attention):
    """`Attention` computed without materialising the (H*W)² logits of all heads; same parameters, same result.

    On CPU without gradients, `blocked_softmax_attention`: the logits a block of query rows at a time, in
    cache, with the relative-position terms added there. Otherwise ``scaled_dot_product_attention`` with
    the terms as its additive mask (fused kernels on GPU; autograd). Installed on an existing block by
    `accelerate_image_encoder` (class swap, no new parameters).
    """

    #: device types on which attention runs in blocks (`blocked_softmax_attention`; it writes into
    #: buffers, so only without gradients); elsewhere SDPA
    blocked_devices = ("cpu",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) tokens of one window (or of the whole image in a global block); returns the same shape."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, H*W, head_dim)
        if x.device.type in self.blocked_devices and not torch.is_grad_enabled():
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B*heads, H*W, head_dim)
            rel_h, rel_w = self._rel_pos_terms(q, height, width) if self.use_rel_pos else (None, None)
            out = blocked_softmax_attention(q * self.scale, k, v, rel_h, rel_w).unflatten(0, (batch, -1))
        else:
            bias = self._rel_pos_bias(q, height, width) if self.use_rel_pos else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))

    def _rel_pos_terms(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decomposed relative-position terms of ``add_decomposed_rel_pos`` for q (N, H*W, head_dim):
        rel_h (N, H*W, H) and rel_w (N, H*W, W), contiguous; query (h, w) to key (h', w') gets
        rel_h[(h, w), h'] + rel_w[(h, w), w'] = q·R_h[h - h'] + q·R_w[w - w']."""
        count, tokens, dim = q.shape
        r_q = q.reshape(count, height, width, dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, self.rel_pos_h).to(q.dtype))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, self.rel_pos_w).to(q.dtype))
        # einsum returns permuted strides: reshape copies them into place
        return rel_h.reshape(count, tokens, height), rel_w.reshape(count, tokens, width)

    def _rel_pos_bias(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The relative-position terms as one additive mask (B, heads, H*W, H*W) for q (B, heads, H*W, head_dim)."""
        batch, heads, tokens, _ = q.shape
        rel_h, rel_w = self._rel_pos_terms(q.flatten(0, 1), height, width)
        bias = rel_h.view(-1, tokens, height, 1) + rel_w.view(-1, tokens, 1, width)
        return bias.reshape(batch, heads, tokens, tokens)


def blocked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              rel_h: Optional[torch.Tensor] = None, rel_w: Optional[torch.Tensor] = None,
                              block_scores: int = 1 << 21) -> torch.Tensor:
    """softmax(q @ kᵀ + bias) @ v, computed for about ``block_scores`` logits at a time.

    Args:
        q: (N, T, E) queries, already scaled; k: (N, S, E) keys; v: (N, S, D) values.
        rel_h, rel_w: None (no bias), or the decomposed relative-position terms (N, T, H) and (N, T, W) of
            keys on an H x W grid (S = H*W): query t to key (h', w') gets rel_h[t, h'] + rel_w[t, w'].
        block_scores: logits per block; 2M (4 MiB in bf16) keeps a block within a CPU's L2/L3 cache.

    Returns:
        (N, T, D). Each block (a few heads' or windows' worth, or some query rows of one head) goes from
        its bias through the matrix product, the softmax and the product with v in one reused buffer,
        so this elementwise work, which limits a CPU with fast matrix products, runs at cache speed and
        the whole (N, T, S) logits never exist.
    """
    if rel_h is not None and rel_h.shape[-1] + rel_w.shape[-1] <= q.shape[-1]:
        # a small grid (a window): its terms cost less folded into the product than added on short rows
        q, k = _fold_rel_pos(q, k, rel_h, rel_w)
        rel_h = rel_w = None
    count, tokens, _ = q.shape
    keys = k.shape[1]
    k_t = k.transpose(1, 2).contiguous()  # (N, E, S)
    rows = min(max(block_scores // keys, 1), tokens)  # query rows per block
    heads = max(block_scores // (keys * tokens), 1) if rows == tokens else 1  # slices of N per block
    out = q.new_empty(count, tokens, v.shape[-1])
    buffer = q.new_empty(heads, rows, keys)
    for first in range(0, count, heads):
        group = slice(first, first + heads)
        for row in range(0, tokens, rows):
            block = (group, slice(row, row + rows))
            scores = buffer[:min(heads, count - first), :min(rows, tokens - row)]
            if rel_h is None:
                torch.matmul(q[block], k_t[group], out=scores)
            else:
                grid = scores.unflatten(-1, (rel_h.shape[-1], rel_w.shape[-1]))
                torch.add(rel_h[block].unsqueeze(-1), rel_w[block].unsqueeze(-2), out=grid)
                scores.baddbmm_(q[block], k_t[group])
            torch.softmax(scores, dim=-1, out=scores)
            torch.matmul(scores, v[group], out=out[block])
    return out


def _fold_rel_pos(q: torch.Tensor, k: torch.Tensor, rel_h: torch.Tensor,
                  rel_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose product includes the relative-position terms (see `blocked_softmax_attention`
    for the shapes): [q, rel_h, rel_w] (N, T, E + H + W) and [k, one-hot of each key's row h', one-hot of
    its column w'] (N, S, E + H + W)."""
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    rows = torch.eye(height, dtype=k.dtype, device=k.device).repeat_interleave(width, dim=0)  # (S, H)
    cols = torch.eye(width, dtype=k.dtype, device=k.device).repeat(height, 1)  # (S, W)
    count = k.shape[0]
    return (torch.cat([q, rel_h, rel_w], dim=-1),
            torch.cat([k, rows.expand(count, -1, -1), cols.expand(count, -1, -1)], dim=-1))


class ContiguousPatchEmbed(PatchEmbed):
    """`PatchEmbed` whose (B, H, W, C) tokens are contiguous rather than a permuted view of the
    convolution's (B, C, H, W) output: every later elementwise result of the residual stream inherits the
    layout of its first operand, and every layer norm then copied the stream to make it contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) images; returns (B, H/16, W/16, C) contiguous tokens."""
        return super().forward(x).contiguous()


def accelerate_image_encoder(sam) -> None:
    """Give every attention block of ``sam.image_encoder`` the fused forward of `FusedAttention`, and its
    patch embedding the contiguous output of `ContiguousPatchEmbed`.

    In place and idempotent; parameters, ``state_dict`` and pickling are unaffected. Only the image
    encoder changes (the mask decoder's attention is a different class, on a few tokens).

    Args:
        sam: a `segment_anything.modeling.Sam` (or anything with an ``image_encoder`` module).
    """
    for module in sam.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
        elif type(module) is PatchEmbed:
            module.__class__ = ContiguousPatchEmbed


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
