"""Saliency methods (M2IB, gScoreCAM, GradCAM) on tiny open_clip CLIP models with random weights.

What random weights can show: shapes, ranges and determinism; that the model is left as it was; that M2IB's
cached prefix is exact (it equals a straightforward run of the whole model at every step, written here);
that gScoreCAM's batched re-scoring equals a one-channel-at-a-time reference; and, with a tower built so
that its output depends only on the top-right quadrant of the image, that M2IB puts the saliency there.

What they cannot show: that GradCAM or gScoreCAM find an object. Both combine *activation maps* of the last
block, and a random tower has no channel whose map follows an object. The quadrant tower does not change
that: no channel's map singles out the quadrant, and its features barely move when the image is masked by
a channel map (cosines of 0.998 to 1 with the unmasked features), so the softmax weights are flat and the
CAM is close to the channel mean, which a LayerNorm output makes about zero. Over seeds 0-9 the quadrant
held 30-42% of the gScoreCAM mass and 17-32% of the GradCAM mass (25% is chance). What is tested instead:
the masked re-scoring ranks a mask that keeps the read quadrant above one that hides it (the part of
gScoreCAM that can localise), gScoreCAM equals a one-channel-at-a-time reference, and GradCAM's channel
weights are not the degenerate zero that a patch-only gradient average gives at this layer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clisc.torchvision_compat import import_torchvision

import_torchvision()

from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402
from open_clip.transformer import ResidualAttentionBlock  # noqa: E402

from clisc.errors import InputError  # noqa: E402
from clisc.precision import prepared  # noqa: E402
from clisc.saliency import (  # noqa: E402
    ClipSaliency,
    compute_saliency,
    gradcam_saliency,
    gscorecam_saliency,
    m2ib_saliency,
)
from clisc.saliency.gradcam import last_block_activations  # noqa: E402
from clisc.saliency.gscorecam import _masked_scores  # noqa: E402
from clisc.saliency.vision_tower import (  # noqa: E402
    features_from_tokens,
    minmax,
    patch_grid,
    tokens_after_block,
    vision_blocks,
)

GRID = 14
TEXT_CFG = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=1)


def tiny_clip(seed: int = 0) -> CLIP:
    """open_clip layout: 4 blocks of width 64, 16 px patches on 224 px (a 14 x 14 grid)."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=4, width=64, patch_size=16, image_size=224, head_width=32)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG).eval()


def tiny_timm_clip(seed: int = 0) -> CustomTextCLIP:
    """BiomedCLIP's layout (timm ViT trunk, linear projection), cut to 4 blocks of width 192."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear", image_size=224)
    model = CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=TEXT_CFG).eval()
    model.visual.trunk.blocks = model.visual.trunk.blocks[:4]
    return model


class _ReadoutBlock(ResidualAttentionBlock):
    """An open_clip block with a fixed attention mask (the vision tower itself passes none)."""

    def __init__(self, width: int, heads: int, mask: torch.Tensor):
        super().__init__(width, heads)
        self.register_buffer("readout_mask", mask)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        return super().forward(q_x, attn_mask=self.readout_mask)


def top_right_patches() -> torch.Tensor:
    """(GRID * GRID,) bool, row-major: the patches of the top-right quadrant."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return ((rows < GRID // 2) & (cols >= GRID // 2)).flatten()


def quadrant_clip(seed: int = 0) -> CLIP:
    """A tiny CLIP whose image features depend only on the top-right quadrant of the image.

    In every block the class token attends to itself and the top-right patches, and each patch only to
    itself, so no other pixel can reach the pooled class token. The top-right quadrant (not a diagonal
    one) also catches a transposed grid.
    """
    model = tiny_clip(seed)
    tokens = GRID * GRID + 1
    allowed = torch.eye(tokens, dtype=torch.bool)
    allowed[0, 1:] = top_right_patches()
    mask = torch.zeros(tokens, tokens).masked_fill(~allowed, float("-inf"))
    model.visual.transformer.resblocks = nn.ModuleList(_ReadoutBlock(64, 2, mask) for _ in range(4))
    return model.eval()


def text_for(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """(1, 32) normalised text embedding of a random token sequence."""
    tokens = torch.randint(1, 100, (1, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.encode_text(tokens, normalize=True)


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


FAST_M2IB = {"layer": 1, "steps": 3, "samples": 2}
METHOD_OPTIONS = {"m2ib": FAST_M2IB, "gscorecam": {"top_k": 16, "batch_size": 8}, "gradcam": {}}


@pytest.fixture(scope="module", params=["open_clip", "timm"])
def model(request):
    return tiny_clip() if request.param == "open_clip" else tiny_timm_clip()


@pytest.mark.parametrize("method", ["m2ib", "gscorecam", "gradcam"])
def test_shape_range_and_dtype(model, method):
    """(B, 224, 224) float32 on the CPU in [0, 1], reaching both ends, for a shared and a per-image text."""
    x = images(2)
    for text in (text_for(model), torch.cat([text_for(model, 0), text_for(model, 1)])):
        options = dict(METHOD_OPTIONS[method], **({"generator": seeded()} if method == "m2ib" else {}))
        maps = compute_saliency(method, model, x, text, **options)
        assert maps.shape == (2, 224, 224) and maps.dtype == torch.float32 and maps.device.type == "cpu"
        assert torch.isfinite(maps).all()
        for single in maps:
            assert single.min() == 0 and single.max() == 1


@pytest.mark.parametrize("method", ["m2ib", "gscorecam", "gradcam"])
def test_model_left_unchanged(method):
    """Weights, requires_grad flags (mixed on purpose), training flag and hooks are as before the call."""
    model = tiny_clip()
    model.visual.conv1.weight.requires_grad_(False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()
    options = dict(METHOD_OPTIONS[method], **({"generator": seeded()} if method == "m2ib" else {}))
    compute_saliency(method, model, images(1), text_for(model), **options)
    assert model.training and all(m.training for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_parameters_require_grad_while_a_method_runs():
    """Autocast caches its bfloat16 copy of a weight only if the weight requires grad; a frozen model ran
    10x slower under CPU bf16 autocast. So the methods mark every parameter while they run (and restore
    the flags, tested above), taking gradients of their own tensors only."""
    model = tiny_clip()
    model.requires_grad_(False)
    with prepared(model):
        assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_m2ib_is_reproducible_with_a_seeded_generator():
    model, x, text = tiny_clip(), images(1), text_for(tiny_clip())
    first = m2ib_saliency(model, x, text, generator=seeded(3), **FAST_M2IB)
    again = m2ib_saliency(model, x, text, generator=seeded(3), **FAST_M2IB)
    other = m2ib_saliency(model, x, text, generator=seeded(4), **FAST_M2IB)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3), "the noise must come from the generator"


def naive_m2ib(model, image, text, layer, beta, steps, samples, generator):
    """M2IB as the authors' code runs it: the whole model every step, the bottleneck spliced in by a hook
    after block ``layer``, the KL written as ``-0.5 (1 + log var - mu^2 - var)``, and the saliency read
    from the bottleneck of the last forward pass."""
    with torch.no_grad():
        tokens = tokens_after_block(model, image[None], layer)[0]
    alpha = torch.full_like(tokens, 5.0, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=1.0)
    capacity = []

    def bottleneck(module, inputs, output):
        lam = torch.sigmoid(alpha)
        mu, var = output * lam, (1 - lam) ** 2
        capacity[:] = [-0.5 * (1 + torch.log(var) - mu**2 - var)]
        noise = torch.randn(output.shape, generator=generator)
        return mu + var.sqrt() * noise

    handle = vision_blocks(model)[layer].register_forward_hook(bottleneck)
    try:
        for _ in range(steps):
            features = model.visual(image[None].expand(samples, -1, -1, -1))
            loss = beta * capacity[0].mean() - F.cosine_similarity(features, text.expand(samples, -1)).mean()
            (alpha.grad,) = torch.autograd.grad(loss, alpha)
            optimizer.step()
    finally:
        handle.remove()
    information = capacity[0].mean(dim=0).sum(dim=-1)[1:].reshape(1, 1, GRID, GRID)
    upsampled = F.interpolate(information, size=224, mode="bilinear")[0]
    return minmax(upsampled.detach())[0]


def test_m2ib_cached_prefix_equals_running_the_whole_model(model):
    """The speed-up (blocks before the bottleneck run once, no weight gradients, the last update skipped)
    changes nothing: same noise, same maps as the authors' whole-model loop."""
    x, text = images(1, seed=5), text_for(model)
    options = {"layer": 1, "beta": 1.0, "steps": 4, "samples": 3}
    fast = m2ib_saliency(model, x, text, generator=seeded(7), **options)[0]
    reference = naive_m2ib(model, x[0], text, generator=seeded(7), **options)
    assert torch.allclose(fast, reference, atol=1e-4), (fast - reference).abs().max()


def test_tower_split_reproduces_the_tower(model):
    """Blocks 0..k then the rest (blocks k+1.., final norm, pooling, projection) give the tower's output."""
    x = images(2)
    with torch.no_grad():
        whole = model.visual(x)
        for k in (0, 2, 3):
            split = features_from_tokens(model, tokens_after_block(model, x, k), k + 1)
            assert torch.allclose(split, whole, atol=1e-5)


def test_m2ib_finds_the_only_quadrant_the_tower_reads():
    """Planted signal: the quadrant tower's features depend only on the top-right quadrant, so only its
    patches help the fitting term and M2IB must keep their information. beta is 0.1 because in a tower
    this small the KL term (a mean over 197 x 64 elements) outweighs any one patch's share of the cosine
    at the paper's beta = 1; over seeds 0-9 the quadrant held 92-97% of the saliency mass at beta 0.1."""
    model = quadrant_clip(seed=1)
    x = images(1, seed=1)
    with torch.no_grad():
        text = model.encode_image(x, normalize=True)
    saliency = m2ib_saliency(model, x, text, layer=1, beta=0.1, generator=seeded())[0]
    inside = saliency[:112, 112:]
    assert inside.sum() / saliency.sum() > 0.8
    assert inside.mean() > 5 * saliency[112:, :].mean()


def test_gscorecam_rescoring_keeps_what_the_tower_reads():
    """The masked re-scoring, gScoreCAM's localising step: in the quadrant tower, with the image's own
    features as text, a channel map covering the top-right quadrant scores above one covering the rest."""
    model = quadrant_clip(seed=2)
    x = images(1, seed=2)
    with torch.no_grad():
        text = model.encode_image(x, normalize=True)
    quadrant = top_right_patches().reshape(GRID, GRID).float()
    maps = torch.stack([quadrant, 1 - quadrant])
    with prepared(model):
        keep, hide = _masked_scores(model, x.expand(2, -1, -1, -1), text.expand(2, -1), maps, None)
    assert keep > hide


def reference_gscorecam(model, image, text, top_k):
    """gScoreCAM one channel at a time, as the paper describes it."""
    with prepared(model):
        activations, gradients = last_block_activations(model, image[None], text)
    maps = patch_grid(activations)[0]
    kept = gradients[0].mean(dim=0).argsort(descending=True)[:top_k]
    scores = []
    for channel in kept:
        mask = F.interpolate(maps[channel][None, None], size=224, mode="bilinear", align_corners=True)[0, 0]  # as the authors do
        mask = (mask - mask.min()) / (mask.max() - mask.min())
        with torch.no_grad():
            features = model.visual(image[None] * mask)
        scores.append(F.cosine_similarity(features, text)[0])
    weights = torch.softmax(model.logit_scale.exp().detach() * torch.stack(scores), dim=0)
    cam = torch.relu((weights[:, None, None] * maps[kept]).sum(dim=0))
    return minmax(F.interpolate(cam[None, None], size=224, mode="bilinear")[0])[0]


def test_gscorecam_batched_equals_one_channel_at_a_time():
    """top_k below the width (ranking used) and a batch size that does not divide it."""
    model = tiny_clip()
    x, text = images(1, seed=3), text_for(model)
    batched = gscorecam_saliency(model, x, text, top_k=20, batch_size=7)[0]
    assert torch.allclose(batched, reference_gscorecam(model, x[0], text, top_k=20), atol=1e-4)


def test_gscorecam_batches_across_images_as_one_pass_at_a_time_does():
    """Masked passes batched 13 at a time over two images (a batch straddles them) give the maps of one pass at a
    time, image by image; progress counts the passes."""
    model = tiny_clip()
    x, text = images(2, seed=4), torch.cat([text_for(model, 0), text_for(model, 1)])
    one_by_one = torch.cat([gscorecam_saliency(model, x[i:i + 1], text[i:i + 1], top_k=20, batch_size=1)
                            for i in range(2)])
    calls = []
    batched = gscorecam_saliency(model, x, text, top_k=20, batch_size=13,
                                 progress=lambda stage, done, total, message: calls.append((done, total)))
    assert torch.allclose(batched, one_by_one, atol=1e-5), (batched - one_by_one).abs().max()
    assert calls == [(13, 40), (26, 40), (39, 40), (40, 40)]


def test_gradcam_channel_weights_come_from_the_class_token():
    """At the last block's MLP norm each token feeds only its own MLP, so with class-token pooling the
    patch gradients are exactly zero: a patch-only average would make every GradCAM map zero. The class
    token's gradient is not zero and the map is not constant."""
    model = tiny_clip()
    x, text = images(2), text_for(model)
    with prepared(model):
        _, gradients = last_block_activations(model, x, text.expand(2, -1))
    assert torch.count_nonzero(gradients[:, 1:]) == 0
    assert torch.count_nonzero(gradients[:, 0]) > 0
    maps = gradcam_saliency(model, x, text)
    assert all(single.max() == 1 and single.min() == 0 for single in maps)


@pytest.mark.parametrize("method", ["m2ib", "gscorecam", "gradcam"])
def test_the_text_changes_the_map(method):
    model, x = tiny_clip(), images(1)
    options = dict(METHOD_OPTIONS[method])
    maps = [
        compute_saliency(method, model, x, text_for(model, seed), **dict(options, **(
            {"generator": seeded()} if method == "m2ib" else {})))
        for seed in (0, 1)
    ]
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)


@pytest.mark.parametrize("method", ["m2ib", "gscorecam", "gradcam"])
def test_bfloat16_autocast_runs_and_agrees(method):
    """Under bf16 autocast the maps stay valid and correlate with the float32 maps."""
    model, x = tiny_clip(), images(1)
    options = dict(METHOD_OPTIONS[method])
    extra = (lambda: {"generator": seeded()}) if method == "m2ib" else dict
    full = compute_saliency(method, model, x, text_for(model), **options, **extra())
    low = compute_saliency(method, model, x, text_for(model), autocast_dtype=torch.bfloat16, **options, **extra())
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and low.min() >= 0 and low.max() <= 1
    assert torch.corrcoef(torch.stack([full.flatten(), low.flatten()]))[0, 1] > 0.9


def test_constant_maps_normalise_to_zeros():
    assert torch.equal(minmax(torch.full((2, 5, 5), 3.0)), torch.zeros(2, 5, 5))


def test_bad_input_is_reported():
    model = tiny_clip()
    text = text_for(model)
    with pytest.raises(InputError, match="layer 9 does not exist.*4 blocks"):
        m2ib_saliency(model, images(1), text)
    with pytest.raises(InputError, match="unknown saliency method"):
        compute_saliency("lime", model, images(1), text)
    with pytest.raises(InputError, match="text embeddings"):
        gradcam_saliency(model, images(3), torch.cat([text, text]))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        gradcam_saliency(model, images(1)[:, :1], text)
    with pytest.raises(InputError, match="ViT image tower"):
        gradcam_saliency(_ModelWithCnnTower(), images(1), text)


class _ModelWithCnnTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Conv2d(3, 8, 3)


def test_clip_saliency_is_the_named_method_with_its_settings_and_beta_for_m2ib_only():
    """The pipeline's bound method gives what a direct call gives: M2IB with the call's β (seeded the same
    way), GradCAM without one (it takes no β: a direct call with one would fail)."""
    model, x, text = tiny_clip(), images(1), text_for(tiny_clip())
    bound = ClipSaliency("m2ib", model, FAST_M2IB)
    for beta in (1.0, 2.0):
        torch.manual_seed(5)
        direct = m2ib_saliency(model, x, text, beta=beta, **FAST_M2IB)
        torch.manual_seed(5)
        assert torch.equal(bound(x, text, beta), direct)
    assert torch.equal(ClipSaliency("gradcam", model)(x, text, 2.0), gradcam_saliency(model, x, text))
    with pytest.raises(InputError, match="unknown saliency method"):
        ClipSaliency("lime", model)(x, text, 1.0)
