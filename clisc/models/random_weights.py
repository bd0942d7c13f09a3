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

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# A small CLIP with the real open_clip classes: ViT image tower, transformer text tower, OpenAI BPE tokenizer.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_random_sam(path: str | Path, architecture: str = "vit_b", seed: int = 0) -> Path:
    """Save a randomly initialised SAM (vit_b|vit_l|vit_h) state dict as a ``.pth`` checkpoint."""
    import_torchvision()
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    path = Path(path)
    torch.save(sam_model_registry[architecture]().state_dict(), path)
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
