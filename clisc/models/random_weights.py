"""Real architectures with random weights, saved in the real checkpoint formats.

No pretrained weights can be fetched on the build machines, so tests and benchmarks make these and load them
through the same loaders as the product (`clisc.models.loaders`). Random weights exercise mechanics,
geometry, speed and memory; they say nothing about accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..torchvision_compat import import_torchvision
from .sam_builders import build_sam

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# A small CLIP with the real open_clip classes: ViT image tower, transformer text tower, OpenAI BPE tokenizer.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_random_sam(path: str | Path, architecture: str = "vit_b", seed: int = 0) -> Path:
    """Save a randomly initialised SAM (vit_b|vit_l|vit_h|litemedsam) state dict as a ``.pth`` checkpoint."""
    torch.manual_seed(seed)
    path = Path(path)
    torch.save(build_sam(architecture).state_dict(), path)
    return path


def save_random_clip(folder: str | Path, model_cfg: dict | str = "ViT-B-16", seed: int = 0) -> Path:
    """Save a randomly initialised open_clip model in open_clip's local-dir layout.

    Args:
        model_cfg: an open_clip model name (full size, e.g. "ViT-B-16") or a model config dict
            (e.g. `TINY_CLIP_CONFIG`).
    """
    import_torchvision()
    import open_clip

    if isinstance(model_cfg, str):
        model_cfg = open_clip.get_model_config(model_cfg)
    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    model = open_clip.model.CLIP(**model_cfg)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def tiny_sam(seed: int = 0, image_size: int = 1024):
    """A small `Sam` of the real classes: 2-block, 32-wide image encoder (windowed + global attention with
    relative positions), by default at SAM's 1024-pixel input, and the full prompt encoder and mask decoder."""
    import_torchvision()
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        depth=2, embed_dim=32, img_size=image_size, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=14,
        out_chans=256)
    grid = image_size // 16
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                   input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    return Sam(encoder, prompt_encoder, decoder, pixel_mean=[123.675, 116.28, 103.53],
               pixel_std=[58.395, 57.12, 57.375]).eval()
