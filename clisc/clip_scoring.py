"""CLIP on slices: text embeddings from prompt ensembles, slice images in and maps out, slice relevance.

Slices go to CLIP whole: padded to a square (bottom and right) and resized to the model's input size, never
centre-cropped, so a saliency map can be put back on the exact pixels of a non-square slice.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.loaders import ClipModel
from .precision import inference
from .runtime import module_forward
from .saliency.kept_tokens import KeptTokens
from .saliency.vision_tower import TowerWithTokens

POSITIVE_TEMPLATES = ("{}", "a medical image showing {}", "a scan with {}", "an image of {}")
NEGATIVE_PROMPTS = ("a medical image of normal healthy tissue", "a medical image with no abnormality",
                    "an empty black background")


class ClipScorer:
    """Scores and embeds slices with an open_clip model.

    Args:
        clip: the loaded model.
        device: where it runs.
        autocast_dtype: dtype for forward passes under autocast, or None for float32.
        runtime: where the image tower runs for `image_embeddings` (`clisc.runtime.RUNTIMES`); text, always
            in PyTorch.

    Attributes:
        kept_tokens: where `image_embeddings` keeps, from the same pass, the tokens after the block M2IB asks
            for (`clisc.saliency.KeptTokens`).
    """

    def __init__(self, clip: ClipModel, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                 runtime: str = "torch") -> None:
        self.clip = clip
        self.model = clip.model.to(device)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.runtime = runtime
        self.kept_tokens = KeptTokens()
        self._tower = None  # the image tower's forward in the runtime, built on first use for kept_tokens.layer
        self.mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)

    def text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean of the L2-normalised embeddings of ``texts``, normalised again: (D,) float32."""
        with inference(self.model, self.device, self.autocast_dtype):
            features = self.model.encode_text(self.clip.tokenizer(list(texts)).to(self.device)).float()
        mean = F.normalize(features, dim=-1).mean(0)
        return F.normalize(mean, dim=0).clone()

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        return self.text_embedding([template.format(prompt) for template in POSITIVE_TEMPLATES])

    def images(self, slices: np.ndarray) -> torch.Tensor:
        """CLIP input (B, 3, S, S), normalised, from uint8 slices (B, H, W): padded square, then resized."""
        batch = torch.as_tensor(slices, device=self.device).float().div(255)[:, None]
        height, width = batch.shape[-2:]
        side = max(height, width)
        batch = F.pad(batch, (0, side - width, 0, side - height))
        size = self.clip.image_size
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (batch.expand(-1, 3, -1, -1) - self.mean) / self.std

    @staticmethod
    def to_slice_grid(maps: torch.Tensor, shape: tuple) -> np.ndarray:
        """Inverse of `images` for maps (B, S, S): back to the slices' (B, H, W) pixels."""
        height, width = shape
        side = max(height, width)
        full = F.interpolate(maps[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)
        return full[:, 0, :height, :width].cpu().numpy()

    def image_embeddings(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings (B, D) of CLIP inputs (B, 3, S, S); the tokens after block
        ``kept_tokens.layer`` of each image are kept (replacing the previous call's) when a layer is set."""
        layer = self.kept_tokens.layer
        if self._tower is None or self._tower[0] != layer:
            probe = torch.randn((1, *images.shape[1:]), generator=torch.Generator().manual_seed(0))
            tower = module_forward(TowerWithTokens(self.model, layer), probe, self.runtime, self.device,
                                   self.autocast_dtype, "clip-tower", batched=True)
            self._tower = (layer, tower)
        self.kept_tokens.clear()
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            features, *tokens = self._tower[1](chunk)
            outputs.append(features.to(self.device))
            if tokens:
                self.kept_tokens.add(chunk, tokens[0], self.autocast_dtype)
        return F.normalize(torch.cat(outputs), dim=-1)

    def tower_runtime(self) -> Optional[dict]:
        """What ran the image tower (`clisc.runtime.forwards`), for the report; None before any image."""
        return self._tower[1].describe() if self._tower is not None else None

    def relevance(self, image_embeddings: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> np.ndarray:
        """Probability (B,) that each image matches ``positive`` rather than ``negative`` (two-way softmax
        of the model's scaled cosine similarities)."""
        scale = self.model.logit_scale.detach().exp().float()
        logits = scale * image_embeddings @ torch.stack([positive, negative]).T
        return logits.softmax(dim=-1)[:, 0].cpu().numpy()
