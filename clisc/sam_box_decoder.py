"""SAM's prompt encoder and mask decoder for one box and an optional mask input, as one module of tensors only:
the part of a prediction that a CPU runtime can run (`clisc.runtime`), the whole of a propagation step's work
after the slice is embedded.

As segment_anything's own ONNX export (``SamOnnxModel``) does, a ``has_mask`` input chooses between the mask
input's embedding and SAM's no-mask embedding, so that one export serves both. For the same box and mask it
computes what ``Sam.prompt_encoder`` then ``Sam.mask_decoder`` compute, with the single-mask output.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class BoxPromptDecoder(nn.Module):
    """``sam``'s prompt encoder and mask decoder (shared, not copied) for a box and an optional mask input."""

    def __init__(self, sam) -> None:
        super().__init__()
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder

    def forward(self, embedding: torch.Tensor, box: torch.Tensor, mask_input: torch.Tensor,
                has_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """embedding (1, 256, 64, 64); box (1, 4) x0, y0, x1, y1 in the model's input pixels; mask_input
        (1, 1, 256, 256) logits; has_mask (1,) 1.0 to use the mask input, 0.0 for none. Returns the
        low-resolution logits (1, 1, 256, 256) and the predicted IoU (1, 1)."""
        sparse, no_mask = self.prompt_encoder(points=None, boxes=box, masks=None)
        dense = has_mask * self.prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask) * no_mask
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)

    @staticmethod
    def probe() -> Tuple[torch.Tensor, ...]:
        """Inputs in the range of real ones, for `clisc.runtime.module_forward`'s check of an export."""
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(1, 256, 64, 64, generator=generator) * 0.5, torch.tensor([[60.0, 70.0, 150.0, 160.0]]),
                torch.randn(1, 1, 256, 256, generator=generator) * 8, torch.ones(1))
