"""SAM's fused-attention image encoder (`clisc.sam_speed`) against segment_anything's own.

Small encoders of the real classes with random weights, relative-position tables drawn at random (stock
zero-initialises them, which would hide a wrong mask). This shows both fused forwards (blocked on CPU, SDPA
with a mask elsewhere) compute the stock function (windowed and global blocks, padded windows, non-square
grids, relative-position terms folded into the product or added, attention split into blocks) and how far
bf16 autocast moves the embedding; it cannot show speed (see scripts/bench_sam_encoder.py) or the effect on
a trained model.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from clisc.models.random_weights import tiny_sam
from clisc.sam_speed import (
    ContiguousPatchEmbed,
    FusedAttention,
    accelerate_image_encoder,
    blocked_softmax_attention,
    image_embeddings,
)
from clisc.torchvision_compat import import_torchvision

import_torchvision()

from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, PatchEmbed  # noqa: E402


def random_rel_pos(module: torch.nn.Module) -> torch.nn.Module:
    for name, parameter in module.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    return module.eval()


def tiny_encoder(global_attn_indexes: tuple) -> ImageEncoderViT:
    """10x10 tokens in 4x4 windows (padded to 12x12), 4 heads of 16 channels."""
    torch.manual_seed(0)
    return random_rel_pos(ImageEncoderViT(
        img_size=80, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, out_chans=32,
        use_rel_pos=True, window_size=4, global_attn_indexes=global_attn_indexes))


def accelerated(encoder: ImageEncoderViT, path: str = "blocked") -> ImageEncoderViT:
    """A copy of ``encoder``, accelerated; path "sdpa" takes the forward used off the CPU."""
    encoder = copy.deepcopy(encoder)
    accelerate_image_encoder(SimpleNamespace(image_encoder=encoder))
    if path == "sdpa":
        for module in encoder.modules():
            if isinstance(module, FusedAttention):
                module.blocked_devices = ()
    return encoder


PATHS = ["blocked", "sdpa"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("global_attn_indexes", [(), (1,), (0, 1)], ids=["windowed", "mixed", "global"])
def test_fused_encoder_equals_stock(global_attn_indexes, path):
    """Windows of 4x4 tokens (head dim 16 > 4 + 4: terms folded into the product), global blocks of 10x10
    (16 < 10 + 10: terms added to the logits)."""
    stock = tiny_encoder(global_attn_indexes)
    fused = accelerated(stock, path)
    images = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        expected, ours = stock(images), fused(images)
        without_rel_pos = accelerated(stock).requires_grad_(False)
        for name, parameter in without_rel_pos.named_parameters():
            if "rel_pos" in name:
                parameter.zero_()
        ignored = without_rel_pos(images)
    assert sum(isinstance(m, FusedAttention) for m in fused.modules()) == 2
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ignored - expected).abs().max() > 1e-2  # the relative-position terms matter at this tolerance


def test_full_size_grid_equals_stock():
    """`tiny_sam`'s encoder at SAM's 1024-pixel input: 64x64 tokens, 14x14 windows padded to 70x70, and
    a global block whose 4096x4096 logits per head take 8 blocks of `blocked_softmax_attention`."""
    stock = random_rel_pos(tiny_sam().image_encoder)
    images = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = stock(images)
    torch.testing.assert_close(image_embeddings(SimpleNamespace(image_encoder=accelerated(stock)), images),
                               expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dim", [32, 8], ids=["folded", "added"])
def test_fused_attention_on_a_non_square_grid(dim, path):
    """Height and width terms differ: swapping them, or the mask's key order, would show here. Head dim
    16 folds the 3 + 5 terms into the product, head dim 4 adds them to the logits."""
    torch.manual_seed(0)
    stock = random_rel_pos(Attention(dim=dim, num_heads=2, use_rel_pos=True, input_size=(3, 5)))
    fused = copy.deepcopy(stock)
    fused.__class__ = FusedAttention
    if path == "sdpa":
        fused.blocked_devices = ()
    tokens = torch.randn(2, 3, 5, dim)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), stock(tokens), atol=1e-5, rtol=1e-5)


def test_accelerate_is_idempotent_and_keeps_the_parameters():
    stock = tiny_encoder((1,))
    once, twice = accelerated(stock), accelerated(accelerated(stock))
    images = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        assert torch.equal(once(images), twice(images))
    assert all(type(m) not in (Attention, PatchEmbed) for m in twice.modules())
    assert isinstance(twice.patch_embed, ContiguousPatchEmbed)
    assert twice.patch_embed(images).is_contiguous()
    assert stock.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in twice.state_dict().items())


def test_sdpa_off_the_cpu_or_with_gradients(monkeypatch):
    """Blocked on CPU without gradients; otherwise SDPA with the relative-position mask (and autograd)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["attn_mask"].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    images = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        accelerated(tiny_encoder((1,)))(images)
        assert calls == []
        accelerated(tiny_encoder((1,)), "sdpa")(images)
    # windowed block: 9 windows of 4x4 tokens; global block: all 10x10 tokens
    assert calls == [(9, 4, 16, 16), (1, 4, 100, 100)]
    fused = accelerated(tiny_encoder((1,)))
    fused(images).sum().backward()
    assert len(calls) == 4 and fused.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0


def reference_attention(q, k, v, rel_h, rel_w):
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    return torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1) @ v


@pytest.mark.parametrize("head_dim", [16, 4], ids=["folded", "added"])
@pytest.mark.parametrize("block_scores", [1, 4 * 15, 2 * 15 * 15 + 1, 1 << 21], ids=["row", "rows", "heads", "all"])
def test_blocked_softmax_attention(block_scores, head_dim):
    """Blocks of one query row, of several rows with a shorter last block, of two heads with a shorter
    last group, and all at once; 5 heads of 15 queries on 3x5 keys."""
    torch.manual_seed(0)
    q, k = torch.randn(5, 15, head_dim), torch.randn(5, 15, head_dim)
    v, rel_h, rel_w = torch.randn(5, 15, 6), torch.randn(5, 15, 3), torch.randn(5, 15, 5)
    expected = reference_attention(q, k, v, rel_h, rel_w)
    ours = blocked_softmax_attention(q, k, v, rel_h, rel_w, block_scores=block_scores)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    without = blocked_softmax_attention(q, k, v, block_scores=block_scores)
    torch.testing.assert_close(without, torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v, atol=1e-5, rtol=1e-5)


def test_image_embeddings_float32_and_bf16():
    stock = tiny_encoder((1,))
    sam = SimpleNamespace(image_encoder=accelerated(stock))
    images = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        expected = stock(images)
    fp32 = image_embeddings(sam, images)
    bf16 = image_embeddings(sam, images, dtype=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == (2, 32, 10, 10)
    assert not fp32.requires_grad
    torch.testing.assert_close(fp32, expected, atol=1e-5, rtol=1e-5)
    relative_error = ((bf16 - expected).norm() / expected.norm()).item()
    assert 0 < relative_error < 0.05  # bf16 keeps 8 bits of mantissa; autocast did run
