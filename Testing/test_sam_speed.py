"""SAM's fused-attention image encoder (`clisc.sam_speed`) against segment_anything's own.

Small encoders of the real classes with random weights, relative-position tables drawn at random (stock
zero-initialises them, which would hide a wrong mask). This shows the fused forward computes the stock
function (windowed and global blocks, padded windows, non-square grids) and how far bf16 autocast moves
the embedding; it cannot show speed (see scripts/bench_sam_encoder.py) or the effect on a trained model.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from clisc.sam_speed import FusedAttention, accelerate_image_encoder, image_embeddings
from clisc.torchvision_compat import import_torchvision

import_torchvision()

from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT  # noqa: E402


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


def accelerated(encoder: ImageEncoderViT) -> ImageEncoderViT:
    encoder = copy.deepcopy(encoder)
    accelerate_image_encoder(SimpleNamespace(image_encoder=encoder))
    return encoder


@pytest.mark.parametrize("global_attn_indexes", [(), (1,), (0, 1)], ids=["windowed", "mixed", "global"])
def test_fused_encoder_equals_stock(global_attn_indexes):
    stock = tiny_encoder(global_attn_indexes)
    fused = accelerated(stock)
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


def test_fused_attention_on_a_non_square_grid():
    """Height and width terms differ: swapping them, or the mask's key order, would show here."""
    torch.manual_seed(0)
    stock = random_rel_pos(Attention(dim=32, num_heads=2, use_rel_pos=True, input_size=(3, 5)))
    fused = copy.deepcopy(stock)
    fused.__class__ = FusedAttention
    tokens = torch.randn(2, 3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), stock(tokens), atol=1e-5, rtol=1e-5)


def test_accelerate_is_idempotent_and_keeps_the_parameters():
    stock = tiny_encoder((1,))
    once, twice = accelerated(stock), accelerated(accelerated(stock))
    images = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        assert torch.equal(once(images), twice(images))
    assert all(type(m) is not Attention for m in twice.modules())
    assert stock.state_dict().keys() == twice.state_dict().keys()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in twice.state_dict().items())


def test_fused_forward_calls_scaled_dot_product_attention(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["attn_mask"].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        accelerated(tiny_encoder((1,)))(torch.randn(1, 3, 80, 80))
    # windowed block: 9 windows of 4x4 tokens; global block: all 10x10 tokens
    assert calls == [(9, 4, 16, 16), (1, 4, 100, 100)]


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
