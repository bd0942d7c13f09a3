"""Tokens after one block of a CLIP image tower, kept from the slice-relevance pass for M2IB (issue 21).

M2IB's bottleneck sits after block ``layer``; the blocks up to it do not depend on the bottleneck, and the
relevance pass has already run them on every candidate slice. M2IB (the consumer) sets `KeptTokens.layer`;
`clisc.clip_scoring.ClipScorer.image_embeddings` (the producer) then keeps, in the same forward pass, the tokens
after that block of every image it embeds; M2IB takes them instead of running those blocks a second time. An
image is found by its bytes (and the precision the tokens were computed in), so a map is never made from
another image's tokens; an image not found is computed as before.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Optional

import torch


class KeptTokens:
    """Tokens (T, D) float32 per image (3, S, S) after block `layer` (None: keep none)."""

    def __init__(self) -> None:
        self.layer: Optional[int] = None
        self._tokens: Dict[bytes, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget every image's tokens (a new relevance pass starts: only one volume's are kept)."""
        self._tokens.clear()

    def add(self, images: torch.Tensor, tokens: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
        """Keep the tokens (B, T, D) after block `layer` of images (B, 3, S, S), computed in precision ``dtype``
        (an autocast dtype; None: float32)."""
        for image, image_tokens in zip(images, tokens):
            self._tokens[self._key(image, self.layer, dtype)] = image_tokens.float()

    def get(self, image: torch.Tensor, layer: int, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        """The kept tokens (T, D) after block ``layer`` of ``image`` (3, S, S) in precision ``dtype``, or None."""
        return self._tokens.get(self._key(image, layer, dtype))

    def __len__(self) -> int:
        return len(self._tokens)

    @staticmethod
    def _key(image: torch.Tensor, layer: Optional[int], dtype: Optional[torch.dtype]) -> bytes:
        data = image.detach().float().cpu().contiguous().numpy()
        return hashlib.blake2b(data.tobytes() + f"{data.shape}{layer}{dtype}".encode(), digest_size=16).digest()
